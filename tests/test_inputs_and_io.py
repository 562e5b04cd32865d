"""Bad inputs get clear errors; unsupported configs raise NotImplementedError; checkpoints round-trip."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from _models import paired, random_batch, tiny_config
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast


@pytest.fixture(scope="module")
def model():
    return bert_fast.BertModel(tiny_config()).eval()


def test_sequence_longer_than_max_positions(model):
    ids = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 65 exceeds .*max_position_embeddings=64"):
        model(ids)


def test_token_id_outside_vocab(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = 97
    with pytest.raises(ValueError, match=r"input_ids contains 97, outside \[0, 97\) \(config.vocab_size=97\)"):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids contains -1"):
        model(ids)


def test_token_type_id_outside_vocab(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    types = torch.full_like(ids, 2)
    with pytest.raises(ValueError, match=r"token_type_ids contains 2, outside \[0, 2\) \(config.type_vocab_size=2\)"):
        model(ids, token_type_ids=types)


def test_position_id_outside_table(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids contains 64"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 64]]))


def test_mask_shape_mismatch(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 6\) but the input ids have shape \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="must be 2D"):
        model(ids, attention_mask=torch.ones(2, 1, 5))


def test_mask_values_must_be_binary(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.ones(2, 5)
    mask[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1 \(token\); found 0.5"):
        model(ids, attention_mask=mask)


def test_4d_masks_per_query_or_soft_bias_rejected(model):
    ids = torch.zeros(2, 4, dtype=torch.long)
    causal = torch.triu(torch.full((4, 4), torch.finfo(torch.float32).min), 1).expand(2, 1, 4, 4)
    with pytest.raises(NotImplementedError, match="varies across query positions"):
        model(ids, attention_mask=causal)
    with pytest.raises(NotImplementedError, match="additive bias"):
        model(ids, attention_mask=torch.full((2, 1, 1, 4), -0.5))
    with pytest.raises(ValueError, match=r"4D attention_mask must have shape \(2, 1, 1, 4\)"):
        model(ids, attention_mask=torch.zeros(2, 2, 1, 4))


def test_empty_batch(model):
    with pytest.raises(ValueError, match=r"empty batch: inputs have shape \(0, 5\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty batch: inputs have shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_mixed_devices(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask is on meta but the model is on cpu"):
        model(ids, attention_mask=torch.ones(2, 5, device="meta"))


def test_ids_and_embeds_exclusive(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 64))


def test_float_ids_rejected(model):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))


def test_all_padding_rows_are_finite(model):
    cfg = model.config
    ids, mask, _ = random_batch([0, 0, 3], cfg)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert (out.last_hidden_state[:2] == 0).all()
    with torch.no_grad():
        out = model(ids[:1], attention_mask=mask[:1])  # nothing but padding
    assert (out.last_hidden_state == 0).all() and torch.isfinite(out.pooler_output).all()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("is_decoder", True, "config.is_decoder=True"),
        ("add_cross_attention", True, "config.add_cross_attention=True"),
        ("position_embedding_type", "relative_key", "config.position_embedding_type='relative_key'"),
        ("hidden_act", "silu", "config.hidden_act='silu'"),
    ],
)
def test_unsupported_configs_raise(field, value, match):
    cfg = tiny_config(**{field: value})
    if field == "add_cross_attention":
        cfg.is_decoder = False
    with pytest.raises(NotImplementedError, match=match):
        bert_fast.BertModel(cfg)
    cfg2 = tiny_config()
    hf = transformers.BertModel(cfg2)
    setattr(hf.config, field, value)
    with pytest.raises(NotImplementedError, match=match):
        bert_fast.optimize(hf)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_save_load_round_trip(tmp_path, safe):
    cfg = tiny_config()
    ref, ours = paired(transformers.BertForSequenceClassification, bert_fast.BertForSequenceClassification, cfg)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ours")
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert list(sd_a) == list(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # HF writes a checkpoint (either format); our drop-in class loads it and runs the same model
    if safe:
        ref.save_pretrained(tmp_path / "hf")
        assert os.path.exists(tmp_path / "hf" / "model.safetensors")
    else:
        (tmp_path / "hf").mkdir()
        ref.config.save_pretrained(tmp_path / "hf")
        torch.save(ref.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    loaded = bert_fast.BertForSequenceClassification.from_pretrained(tmp_path / "hf", backend="torch")
    assert isinstance(loaded, transformers.BertForSequenceClassification) and bert_fast.is_optimized(loaded)
    assert loaded.bert.__dict__["_bert_fast_backend"] == "torch"
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids, mask, _ = random_batch([5, 2], cfg)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = loaded.eval()(ids, attention_mask=mask).logits
    assert_close_fp32(b, a, FP32_MODEL_ATOL, "loaded logits")


def test_bert_model_from_pretrained(tmp_path):
    cfg = tiny_config()
    ref, _ = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ref.save_pretrained(tmp_path)
    ours = bert_fast.BertModel.from_pretrained(tmp_path).eval()
    assert type(ours) is bert_fast.BertModel
    ids, mask, _ = random_batch([6, 3, 1], cfg)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).last_hidden_state
        b = ours(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, "from_pretrained")
