"""Parity of the drop-in model with transformers (fp32, CPU, valid tokens; DESIGN.md §5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from _check import assert_left_padding_and_embeds
from _models import backends_for_models, paired, random_batch, tiny_config
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast

# (hidden, heads) -> head_dim 16, 26, 32, 64
SHAPES = [(64, 4), (312, 12), (384, 12), (64, 1)]
ACTS = ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]
LENGTHS = [1, 7, 0, 13, 5]  # a length-1 sequence and an all-padding row


def _compare_base(ref, ours, ids, mask, types, **kw):
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, **kw)
        b = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, **kw)
    valid = mask.bool()
    assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, "last_hidden_state")
    assert len(a.hidden_states) == len(b.hidden_states)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        assert_close_fp32(y[valid], x[valid], FP32_MODEL_ATOL, f"hidden_states[{i}]")
    # pooler reads position 0: compare rows whose first token is real
    first = valid[:, 0]
    assert_close_fp32(b.pooler_output[first], a.pooler_output[first], FP32_MODEL_ATOL, "pooler_output")
    # padded positions are zeros, and everything is finite
    assert torch.isfinite(b.last_hidden_state).all() and torch.isfinite(b.pooler_output).all()
    assert (b.last_hidden_state[~valid] == 0).all()
    return a, b


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("hidden,heads", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_random_config_parity(backend, hidden, heads, act):
    layers = 1 + (hidden + len(act)) % 3  # 1-3 layers, varied across the grid
    eps = 1e-12 if act in ("gelu", "relu") else 1e-5
    cfg = tiny_config(hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden + 6,
                      hidden_act=act, layer_norm_eps=eps, num_hidden_layers=layers)
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend=backend)
    ids, mask, types = random_batch(LENGTHS, cfg, seq_len=16)
    _compare_base(ref, ours, ids, mask, types)


@pytest.mark.parametrize("backend", backends_for_models())
def test_no_padding_and_no_mask(backend):
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    with torch.no_grad():
        a, b = ref(ids), ours(ids)
    assert_close_fp32(b.last_hidden_state, a.last_hidden_state, FP32_MODEL_ATOL, "no mask")
    assert_close_fp32(b.pooler_output, a.pooler_output, FP32_MODEL_ATOL, "no mask pooler")


def test_left_padding_position_ids_and_inputs_embeds():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ids, mask, types = random_batch([5, 8, 3], cfg)
    mask = mask.flip(1)  # left padding: real tokens at the end of each row
    pos = torch.randint(0, cfg.max_position_embeddings, ids.shape)
    assert_left_padding_and_embeds(ref, ours, ids, mask, "last_hidden_state", token_type_ids=types, position_ids=pos)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
def test_mask_dtypes_and_4d_mask(mask_dtype):
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ids, mask, _ = random_batch([4, 9, 1], cfg)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask)
        b = ours(ids, attention_mask=mask.to(mask_dtype))
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        c = ours(ids, attention_mask=additive)
    valid = mask.bool()
    assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, f"{mask_dtype}")
    assert torch.equal(c.last_hidden_state, b.last_hidden_state)


def test_return_dict_false_and_no_pooler():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg, add_pooling_layer=False)
    ids, mask, _ = random_batch([4, 2], cfg)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, return_dict=False)
        b = ours(ids, attention_mask=mask, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a)
    valid = mask.bool()
    assert_close_fp32(b[0][valid], a[0][valid], FP32_MODEL_ATOL, "tuple output")


TASKS = [
    ("BertForMaskedLM", lambda ids, mask: {"labels": torch.where(mask.bool(), ids, -100)}, "logits"),
    ("BertForPreTraining", lambda ids, mask: {"labels": torch.where(mask.bool(), ids, -100),
                                               "next_sentence_label": torch.tensor([0, 1, 1])}, "prediction_logits"),
    ("BertForNextSentencePrediction", lambda ids, mask: {"labels": torch.tensor([0, 1, 0])}, "logits"),
    ("BertForSequenceClassification", lambda ids, mask: {"labels": torch.tensor([0, 2, 1])}, "logits"),
    ("BertForTokenClassification", lambda ids, mask: {"labels": torch.where(mask.bool(), ids % 3, -100)}, "logits"),
    ("BertForQuestionAnswering", lambda ids, mask: {"start_positions": torch.tensor([0, 3, 1]),
                                                     "end_positions": torch.tensor([2, 5, 1])}, "start_logits"),
]


@pytest.mark.parametrize("name,labels,key", TASKS, ids=[t[0] for t in TASKS])
def test_task_heads(name, labels, key):
    cfg = tiny_config(num_labels=2 if name == "BertForQuestionAnswering" else 3)
    ref, ours = paired(getattr(transformers, name), getattr(bert_fast, name), cfg)
    assert isinstance(ours, getattr(transformers, name))
    assert bert_fast.is_optimized(ours)
    ids, mask, types = random_batch([6, 9, 2], cfg)
    kw = labels(ids, mask)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types, **kw)
        b = ours(ids, attention_mask=mask, token_type_ids=types, **kw)
    logits_a, logits_b = a[key], b[key]
    if logits_a.dim() == 3 or (logits_a.dim() == 2 and logits_a.shape[1] == ids.shape[1]):  # per-token outputs
        valid = mask.bool()
        logits_a, logits_b = logits_a[valid], logits_b[valid]
    assert_close_fp32(logits_b, logits_a, FP32_MODEL_ATOL, f"{name}.{key}")
    if name == "BertForQuestionAnswering":
        # HF's span loss takes a softmax over *every* position, padding included, and our padded
        # positions are zeros by design (README, "Parity"): compare the loss on an unpadded batch.
        mask = torch.ones_like(mask)
        with torch.no_grad():
            a = ref(ids, attention_mask=mask, token_type_ids=types, **kw)
            b = ours(ids, attention_mask=mask, token_type_ids=types, **kw)
    assert_close_fp32(b.loss, a.loss, FP32_MODEL_ATOL, f"{name}.loss")


def test_multiple_choice():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertForMultipleChoice, bert_fast.BertForMultipleChoice, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 4, 7))
    mask = torch.ones_like(ids)
    mask[0, 1, 3:] = 0
    mask[1, 2, 1:] = 0
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, labels=labels)
        b = ours(ids, attention_mask=mask, labels=labels)
    assert_close_fp32(b.logits, a.logits, FP32_MODEL_ATOL, "multiple choice logits")
    assert_close_fp32(b.loss, a.loss, FP32_MODEL_ATOL, "multiple choice loss")


@pytest.mark.parametrize("backend", backends_for_models())
def test_gradients_match_hf_in_training_mode(backend):
    cfg = tiny_config(num_hidden_layers=2, hidden_act="gelu")
    ref, ours = paired(transformers.BertForSequenceClassification, bert_fast.BertForSequenceClassification, cfg)
    bert_fast.optimize(ours, backend=backend)
    ref.train()
    ours.train()
    ids, mask, types = random_batch([6, 1, 9, 4], cfg)
    labels = torch.tensor([0, 2, 1, 1])
    weights = torch.randn(4, 9, cfg.hidden_size)
    losses = []
    for model in (ref, ours):
        model.zero_grad()
        out = model(ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
        token_term = (out.hidden_states[-1] * weights)[mask.bool()].mean()
        (out.loss + token_term).backward()
        losses.append(out.loss.detach())
    assert_close_fp32(losses[1], losses[0], FP32_MODEL_ATOL, "training loss")
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name}: HF has no grad, ours is nonzero"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert_close_fp32(p.grad, q.grad, FP32_MODEL_ATOL, f"grad {name}")
        checked += 1
    assert checked >= 30


def test_training_with_dropout_runs_and_is_finite():
    cfg = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ours.train()
    ids, mask, _ = random_batch([5, 0, 3], cfg)
    out = ours(ids, attention_mask=mask)
    out.last_hidden_state.sum().backward()
    assert torch.isfinite(out.last_hidden_state).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.encoder.parameters())
    ours.eval()
    with torch.no_grad():  # dropout off again: deterministic
        x = ours(ids, attention_mask=mask).last_hidden_state
        y = ours(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(x, y)


def test_output_attentions_falls_back_with_one_warning():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ids, mask, _ = random_batch([4, 6], cfg)
    import bert_fast.modeling as modeling

    modeling._warned.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ref(ids, attention_mask=mask, output_attentions=True)
        b = ours(ids, attention_mask=mask, output_attentions=True)
        ours(ids, attention_mask=mask, output_attentions=True)
    ours_warnings = [w for w in caught if "bert_fast" in str(w.message)]
    assert len(ours_warnings) == 1 and "output_attentions" in str(ours_warnings[0].message)
    assert len(b.attentions) == cfg.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert torch.equal(x, y)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_optimize_shares_parameters_and_revert_restores():
    cfg = tiny_config()
    ref, _ = paired(transformers.BertForSequenceClassification, bert_fast.BertForSequenceClassification, cfg)
    hf_forward = transformers.BertModel.forward
    model = copy.deepcopy(ref)
    params_before = {n: p for n, p in model.named_parameters()}
    ids, mask, _ = random_batch([3, 8, 5], cfg)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        assert bert_fast.optimize(model) is model
        assert bert_fast.is_optimized(model)
        fast = model(ids, attention_mask=mask).logits
        # same Parameter objects, no copies, same state_dict keys
        assert all(p is params_before[n] for n, p in model.named_parameters())
        assert list(model.state_dict()) == list(ref.state_dict())
        # only the instance changed
        assert transformers.BertModel.forward is hf_forward
        assert type(ref.bert) is transformers.BertModel
        bert_fast.revert(model)
        assert type(model.bert) is transformers.BertModel and not bert_fast.is_optimized(model)
        back = model(ids, attention_mask=mask).logits
    assert_close_fp32(fast, base, FP32_MODEL_ATOL, "optimized logits")
    assert torch.equal(back, base)


def test_weight_update_invalidates_fused_qkv_cache():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ids, mask, _ = random_batch([5, 3], cfg)
    with torch.no_grad():
        ours(ids, attention_mask=mask)  # builds the cache
        for model in (ref, ours):
            model.encoder.layer[0].attention.self.key.weight.mul_(1.5)
        a, b = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, "after update")


def test_optimize_rejects_non_bert():
    with pytest.raises(TypeError, match="expects a transformers Bert"):
        bert_fast.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        bert_fast.optimize(transformers.BertModel(tiny_config()), backend="cuda")


def test_model_built_under_inference_mode():
    """Parameters that are inference tensors have no version counter; the QKV cache must cope."""
    cfg = tiny_config()
    ref, _ = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ids, mask, _ = random_batch([4, 6], cfg)
    with torch.inference_mode():
        ours = bert_fast.optimize(copy.deepcopy(ref), backend="torch")
        a = ref(ids, attention_mask=mask).last_hidden_state
        b = ours(ids, attention_mask=mask).last_hidden_state
        c = ours(ids, attention_mask=mask).last_hidden_state  # cached fused weights
    valid = mask.bool()
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, "inference-mode model")
    assert torch.equal(b, c)
