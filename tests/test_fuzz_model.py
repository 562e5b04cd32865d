"""Property-based fuzzing of the whole model: ``bert_fast.optimize`` on a tiny random
``transformers.BertModel`` against the same model un-optimized, fp32 on CPU.

Drawn per example: a config (layers, heads, head_dim including odd ones, intermediate size,
activation, eps, vocab/position/type sizes), a batch (rows of any length from 0 to the sequence
length: all-padding and length-1 rows), the mask form (none, 2-D right or left padding in bool,
int or float, 4-D additive or boolean (B, 1, 1, L) / (B, 1, L, L) key-padding masks), and the
inputs (ids or ``inputs_embeds``, with or without ``token_type_ids`` and random ``position_ids``).
Compared on valid tokens with the fp32 model bound of the tolerance table; every output finite;
padded positions zero. Bounded example counts (``_check.fuzz_settings``) keep it CI-sized.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _check import fuzz_settings
from _models import backends_for_models, tiny_config
from hypothesis import given
from hypothesis import strategies as st
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast

MASK_FORMS = ("none", "right", "left", "random", "4d-additive", "4d-bool", "4d-square")


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([1, 8, 13, 16, 26]))
    hidden = heads * head_dim
    act = draw(st.sampled_from(["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]))
    return tiny_config(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=draw(st.sampled_from([1, 7, 2 * hidden + 3])),
        num_hidden_layers=draw(st.integers(1, 3)),
        hidden_act=act,
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5])),
        vocab_size=draw(st.sampled_from([5, 31, 97])),
        max_position_embeddings=draw(st.sampled_from([16, 40])),
        type_vocab_size=draw(st.sampled_from([1, 2, 3])),
    )


def _models(config: transformers.BertConfig, backend: str):
    ref = transformers.BertModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    with torch.no_grad():  # HF initializes LayerNorms to (1, 0) and biases to 0: perturb them so fusion bugs show
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = copy.deepcopy(ref)
    bert_fast.optimize(ours, backend=backend)
    return ref, ours


def _mask(form: str, lens: list[int], seq: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(mask for HF, mask for ours, valid (B, L) bool) for one mask form."""
    b = len(lens)
    valid = torch.zeros(b, seq, dtype=torch.bool)
    for i, n in enumerate(lens):
        if form == "left":
            valid[i, seq - n :] = True
        elif form == "random":
            valid[i, torch.randperm(seq)[:n]] = True
        else:
            valid[i, :n] = True
    if form == "none":
        return None, None, torch.ones(b, seq, dtype=torch.bool)
    hf = valid.long()
    if form == "4d-additive":
        ours = (1.0 - valid[:, None, None, :].float()) * torch.finfo(torch.float32).min
    elif form == "4d-bool":
        ours = valid[:, None, None, :]
    elif form == "4d-square":  # (B, 1, L, L): the same key mask for every query
        ours = valid[:, None, None, :].expand(b, 1, seq, seq).contiguous()
    else:
        ours = valid.to(torch.float32 if form == "random" else torch.bool if form == "right" else torch.int32)
    return hf, ours, valid


@pytest.mark.parametrize("backend", backends_for_models())
def test_fuzz_model_matches_transformers(backend):
    @fuzz_settings(backend, "cpu", max_examples=20)
    @given(
        config=configs(),
        seq=st.integers(1, 12),
        data=st.data(),
        form=st.sampled_from(MASK_FORMS),
        use_embeds=st.booleans(),
        with_types=st.booleans(),
        with_positions=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(config, seq, data, form, use_embeds, with_types, with_positions, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        seq = min(seq, config.max_position_embeddings)
        lens = data.draw(st.lists(st.integers(0, seq), min_size=1, max_size=4), label="lengths")
        if form == "none":
            lens = [seq] * len(lens)
        ref, ours = _models(config, backend)
        hf_mask, our_mask, valid = _mask(form, lens, seq)
        b = len(lens)
        kw = {}
        if use_embeds:
            kw["inputs_embeds"] = torch.randn(b, seq, config.hidden_size)
        else:
            kw["input_ids"] = torch.randint(0, config.vocab_size, (b, seq))
        if with_types:
            kw["token_type_ids"] = torch.randint(0, config.type_vocab_size, (b, seq))
        if with_positions:
            kw["position_ids"] = torch.randint(0, config.max_position_embeddings, (b, seq))
        what = f"{backend} {form} lens={lens} embeds={use_embeds} types={with_types} positions={with_positions}"
        with torch.no_grad():
            a = ref(attention_mask=hf_mask, output_hidden_states=True, **kw)
            o = ours(attention_mask=our_mask, output_hidden_states=True, **kw)
        assert torch.isfinite(o.last_hidden_state).all() and torch.isfinite(o.pooler_output).all(), what
        assert len(o.hidden_states) == len(a.hidden_states), what
        for i, (x, y) in enumerate(zip(a.hidden_states, o.hidden_states)):
            assert_close_fp32(y[valid], x[valid], FP32_MODEL_ATOL, f"{what}: hidden_states[{i}]")
        assert_close_fp32(o.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, what)
        assert (o.last_hidden_state[~valid] == 0).all(), f"{what}: padded positions are not zero"
        first = valid[:, 0]  # the pooler reads position 0
        assert_close_fp32(o.pooler_output[first], a.pooler_output[first], FP32_MODEL_ATOL, f"{what}: pooler")
        with torch.no_grad():
            again = ours(attention_mask=our_mask, **kw).last_hidden_state
        assert torch.equal(again, o.last_hidden_state), f"{what}: two identical calls differ"

    case()


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("lens", [[0, 0, 0], [0, 5, 1]], ids=["every-row-padding", "one-row-padding"])
def test_all_padding_rows_are_finite_zeros(backend, lens):
    config = tiny_config()
    ref, ours = _models(config, backend)
    hf_mask, our_mask, valid = _mask("right", lens, 6)
    ids = torch.randint(0, config.vocab_size, (len(lens), 6))
    with torch.no_grad():
        a = ref(ids, attention_mask=hf_mask)
        o = ours(ids, attention_mask=our_mask)
    assert torch.isfinite(o.last_hidden_state).all() and torch.isfinite(o.pooler_output).all()
    assert (o.last_hidden_state[~valid] == 0).all()
    assert_close_fp32(o.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, f"{backend} {lens}")
