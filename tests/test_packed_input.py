"""Packed (flattened) input: HF's ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` layout.

(1, T) tokens, ``position_ids`` restarting at 0, ``cu_seq_lens_q/k`` and ``max_length_q/k``, no mask:
the outputs must equal running every sequence alone, for every task head and backend.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from _models import backends_for_models, paired, tiny_config
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast

LENGTHS = [5, 1, 9, 3]

# head -> (output fields per token (concatenated along dim 1), per-sequence fields (along dim 0))
HEADS = {
    "BertModel": (["last_hidden_state"], ["pooler_output"]),
    "BertForMaskedLM": (["logits"], []),
    "BertForPreTraining": (["prediction_logits"], ["seq_relationship_logits"]),
    "BertForNextSentencePrediction": ([], ["logits"]),
    "BertForSequenceClassification": ([], ["logits"]),
    "BertForTokenClassification": (["logits"], []),
    "BertForQuestionAnswering": (["start_logits", "end_logits"], []),
    "BertForMultipleChoice": ([], ["logits"]),
}


def _packed_batch(cfg, lengths=LENGTHS):
    seqs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    types = [torch.randint(0, cfg.type_vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, types, torch.cat(seqs, 1), torch.cat(types, 1), pos, cu


def _flash_kwargs(cu, lengths=LENGTHS):
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))


def _reshape_for(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if name == "BertForMultipleChoice" else t  # (1, choices=1, L)


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("form", ["flash_kwargs", "position_ids_only"])
def test_packed_equals_per_sequence(head, backend, form):
    cfg = tiny_config(num_labels=2 if head == "BertForQuestionAnswering" else 3)
    ref, ours = paired(getattr(transformers, head), getattr(bert_fast, head), cfg)
    bert_fast.optimize(ours, backend=backend)
    seqs, types, ids, tt, pos, cu = _packed_batch(cfg)
    extra = _flash_kwargs(cu) if form == "flash_kwargs" else {}
    with torch.no_grad():
        out = ours(_reshape_for(head, ids), token_type_ids=_reshape_for(head, tt),
                   position_ids=_reshape_for(head, pos), **extra)  # fmt: skip
        refs = [ref(_reshape_for(head, s), token_type_ids=_reshape_for(head, t)) for s, t in zip(seqs, types)]
    per_token, per_seq = HEADS[head]
    for field in per_token:
        expected = torch.cat([r[field] for r in refs], 1)
        assert out[field].shape == expected.shape, field
        assert_close_fp32(out[field], expected, FP32_MODEL_ATOL, f"{head}.{field}")
    for field in per_seq:
        expected = torch.cat([r[field] for r in refs], 0)
        assert out[field].shape == expected.shape, field
        assert_close_fp32(out[field], expected, FP32_MODEL_ATOL, f"{head}.{field}")


def test_packed_inputs_embeds_hidden_states_and_no_validation():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    seqs, _, ids, _, pos, cu = _packed_batch(cfg)
    embeds = ref.embeddings.word_embeddings(ids)
    with torch.no_grad():
        a = ours(inputs_embeds=embeds, position_ids=pos, output_hidden_states=True, **_flash_kwargs(cu))
        b = ours(ids, position_ids=pos, validate_inputs=False, **_flash_kwargs(cu))
        c = ours(ids, cu_seq_lens_q=cu)  # offsets only: positions derived from them, max length computed
        refs = [ref(s, output_hidden_states=True) for s in seqs]
    expected = torch.cat([r.last_hidden_state for r in refs], 1)
    for got, what in ((a.last_hidden_state, "inputs_embeds"), (b.last_hidden_state, "validate_inputs=False"),
                      (c.last_hidden_state, "cu only")):  # fmt: skip
        assert_close_fp32(got, expected, FP32_MODEL_ATOL, what)
    assert len(a.hidden_states) == cfg.num_hidden_layers + 1
    for i, h in enumerate(a.hidden_states):
        assert_close_fp32(h, torch.cat([r.hidden_states[i] for r in refs], 1), FP32_MODEL_ATOL, f"hidden {i}")


def test_packed_training_gradients_flow():
    cfg = tiny_config()
    _, ours = paired(transformers.BertForSequenceClassification, bert_fast.BertForSequenceClassification, cfg)
    ours.train()
    _, _, ids, _, pos, cu = _packed_batch(cfg)
    out = ours(ids, position_ids=pos, labels=torch.tensor([0, 1, 2, 1]), **_flash_kwargs(cu))
    assert out.logits.shape == (len(LENGTHS), cfg.num_labels)
    out.loss.backward()
    assert ours.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def _bad_calls(cfg):
    _, _, ids, _, pos, cu = _packed_batch(cfg)
    total = ids.shape[1]
    good = _flash_kwargs(cu)

    def kw(**changes):
        return {**good, **changes}

    return [
        ("int32", dict(kw(cu_seq_lens_q=cu.long(), cu_seq_lens_k=cu.long()))),
        ("1-D tensor", dict(kw(cu_seq_lens_q=cu[None], cu_seq_lens_k=cu[None]))),
        ("start at 0", dict(kw(cu_seq_lens_q=cu + 1, cu_seq_lens_k=cu + 1))),
        ("never decrease", dict(kw(cu_seq_lens_q=cu.flip(0).contiguous(), cu_seq_lens_k=cu.flip(0).contiguous()))),
        (f"end at the number of tokens \\({total}\\)", dict(kw(cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1]))),
        ("cu_seq_lens_k differs", dict(kw(cu_seq_lens_k=torch.tensor([0, 6, 7, 15, 18], dtype=torch.int32)))),
        ("max_length_q=3 but the longest", dict(kw(max_length_q=3, max_length_k=3))),
        (r"max_length_q \(9\) != max_length_k \(8\)", dict(kw(max_length_k=8))),
        ("takes no attention_mask", dict(kw(attention_mask=torch.ones(1, total).index_fill_(1, torch.tensor([2]), 0)))),
        ("input_ids of shape \\(1, total_tokens\\)", dict(kw(input_ids=ids.view(2, -1) if total % 2 == 0 else
                                                              torch.cat([ids, ids])))),
        ("position_ids contains", dict(kw(position_ids=pos + 60))),
        ("exceeds the model's maximum", dict(cu_seq_lens_q=torch.tensor([0, 2, 70], dtype=torch.int32),
                                             input_ids=torch.zeros(1, 70, dtype=torch.long), position_ids=None)),
        ("is on meta", dict(kw(cu_seq_lens_q=cu.to("meta"), cu_seq_lens_k=cu.to("meta")))),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(13))
def test_bad_packed_input_raises(case):
    cfg = tiny_config()
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    _, _, ids, _, pos, _ = _packed_batch(cfg)
    match, kwargs = _bad_calls(cfg)[case]
    kwargs.setdefault("input_ids", ids)
    if "cu_seq_lens_q" in kwargs or "cu_seq_lens_k" in kwargs:
        kwargs.setdefault("position_ids", pos)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        ours(**kwargs)


def test_packed_with_a_reference_only_feature_raises_instead_of_mixing_sequences():
    cfg = tiny_config()
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    _, _, ids, _, pos, cu = _packed_batch(cfg)
    with pytest.raises(NotImplementedError, match="attend across the packed sequences"), torch.no_grad():
        ours(ids, position_ids=pos, output_attentions=True, **_flash_kwargs(cu))


def test_one_row_with_other_position_ids_is_one_sequence():
    """Position ids that are not sequences laid end to end (here rotated, so they start at 1 and
    restart in the middle) keep HF's eager/sdpa meaning for one unmasked row: one sequence with
    those positions, never a packed batch."""
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    _, _, ids, _, pos, _ = _packed_batch(cfg)
    rotated = torch.cat([pos[:, 1:], pos[:, :1]], 1)
    with torch.no_grad():
        a = ours(input_ids=ids, position_ids=rotated)
        r = ref(input_ids=ids, position_ids=rotated)
    assert a.pooler_output.shape[0] == 1
    assert_close_fp32(a.last_hidden_state, r.last_hidden_state, FP32_MODEL_ATOL, "one sequence")
