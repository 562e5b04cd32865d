"""The BERT family (RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT): parity with transformers.

Random tiny configs, fp32 on valid tokens (DESIGN.md §5), for every family x head, right and left
padding, packed input, on the torch and cpp backends; bf16 by the half-precision rule.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from _check import assert_left_padding_and_embeds
from _models import backends_for_models
from tolerances import FP32_MODEL_ATOL, HALF_MODEL_FACTOR, assert_close_fp32, assert_half_rule

import bert_fast
from bert_fast.families import family_of, takes_packed_kwargs

PAD = 1  # RoBERTa's padding_idx; real tokens are drawn from [2, vocab)


def _config(family: str, **overrides):
    common = dict(vocab_size=97, max_position_embeddings=64, num_labels=3, pad_token_id=PAD)
    if family == "distilbert":
        kw = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=96, dropout=0.0, attention_dropout=0.0,
                  activation="gelu", sinusoidal_pos_embds=False)
        kw.update(common, **overrides)
        return transformers.DistilBertConfig(**kw)
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5)
    if family == "electra":
        kw.update(embedding_size=32, type_vocab_size=2)
        kw.update(common, **overrides)
        return transformers.ElectraConfig(**kw)
    # RoBERTa-shaped: one token type, positions offset by padding_idx + 1
    kw.update(type_vocab_size=1, max_position_embeddings=64 + PAD + 1)
    kw.update({k: v for k, v in common.items() if k != "max_position_embeddings"}, **overrides)
    cls = {"roberta": transformers.RobertaConfig, "xlm-roberta": transformers.XLMRobertaConfig,
           "camembert": transformers.CamembertConfig}[family]
    return cls(**kw)


PREFIX = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert", "electra": "Electra",
          "distilbert": "DistilBert"}
FAMILIES = list(PREFIX)
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice"]
CASES = [(f, h) for f in FAMILIES for h in HEADS] + [("electra", "ForPreTraining")]


def _randomize(model: torch.nn.Module) -> None:
    """HF initializes LayerNorms to (1, 0) and biases to 0; perturb them so fusion bugs show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def _paired(family: str, head: str, config=None, **kwargs):
    config = config or _config(family, **({"num_labels": 2} if head == "ForQuestionAnswering" else {}))
    name = PREFIX[family] + head
    torch.manual_seed(1234)
    ref = getattr(transformers, name)._from_config(copy.deepcopy(config), attn_implementation="eager", **kwargs)
    _randomize(ref)
    ours = getattr(bert_fast, name)(copy.deepcopy(config), **kwargs)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    assert isinstance(ours, getattr(transformers, name)) and bert_fast.is_optimized(ours)
    return ref.eval(), ours.eval(), config


def _batch(family: str, lengths: list[int], config, seq_len: int | None = None, left: bool = False):
    seq_len = seq_len or max(lengths)
    ids = torch.randint(2, config.vocab_size, (len(lengths), seq_len))
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    if left:
        mask = mask.flip(1)
    ids = torch.where(mask.bool(), ids, PAD)  # tokenizers pad with the padding id (RoBERTa positions read it)
    types = None
    if family == "electra":
        types = torch.randint(0, 2, ids.shape)
    return ids, mask, types


def _kw(types):
    return {} if types is None else {"token_type_ids": types}


def _labels(head: str, ids, mask, rows: int):
    if head in ("ForMaskedLM", "ForPreTraining") and head == "ForMaskedLM":
        return {"labels": torch.where(mask.bool(), ids, -100)}
    if head == "ForPreTraining":
        return {"labels": mask.clone()}  # replaced-token detection labels (0/1 per token)
    if head == "ForSequenceClassification":
        return {"labels": torch.arange(rows) % 3}
    if head == "ForTokenClassification":
        return {"labels": torch.where(mask.bool(), ids % 3, -100)}
    if head == "ForQuestionAnswering":
        return {"start_positions": torch.arange(rows) % 2, "end_positions": torch.arange(rows) % 2 + 1}
    return {}


def _compare_outputs(head, a, b, mask, what):
    """Every tensor output of a head: per-token outputs on valid tokens, the others whole."""
    valid = mask.bool()
    keys = [k for k in a.keys() if isinstance(a[k], torch.Tensor)]
    assert keys, what
    for key in keys:
        x, y = a[key], b[key]
        if key == "loss":
            continue
        if x.dim() >= 2 and x.shape[:2] == valid.shape:  # per-token
            x, y = x[valid], y[valid]
        assert_close_fp32(y, x, FP32_MODEL_ATOL, f"{what}.{key}")
    if "hidden_states" in a and a.hidden_states is not None:
        assert len(a.hidden_states) == len(b.hidden_states), what
        for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
            assert_close_fp32(y[valid], x[valid], FP32_MODEL_ATOL, f"{what}.hidden_states[{i}]")


# --------------------------------------------------------------------------------------------------
# Padded input: every family x head, on every backend here
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("family,head", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_family_head_parity(backend, family, head):
    ref, ours, config = _paired(family, head)
    bert_fast.optimize(ours, backend=backend)
    if head == "ForMultipleChoice":
        ids = torch.randint(2, config.vocab_size, (2, 3, 9))
        mask = torch.ones_like(ids)
        mask[0, 1, 4:] = 0
        mask[1, 2, 1:] = 0
        ids = torch.where(mask.bool(), ids, PAD)
        kw = {"labels": torch.tensor([1, 2])}
        if family == "electra":
            kw["token_type_ids"] = torch.randint(0, 2, ids.shape)
        with torch.no_grad():
            a, b = ref(ids, attention_mask=mask, **kw), ours(ids, attention_mask=mask, **kw)
        assert_close_fp32(b.logits, a.logits, FP32_MODEL_ATOL, "multiple choice logits")
        assert_close_fp32(b.loss, a.loss, FP32_MODEL_ATOL, "multiple choice loss")
        return
    ids, mask, types = _batch(family, [6, 9, 1, 4], config)
    kw = _labels(head, ids, mask, ids.shape[0])
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, output_hidden_states=True, **_kw(types), **kw)
        b = ours(ids, attention_mask=mask, output_hidden_states=True, **_kw(types), **kw)
    _compare_outputs(head, a, b, mask, f"{family}{head}")
    if "loss" in a and a.loss is not None and head != "ForQuestionAnswering":
        assert_close_fp32(b.loss, a.loss, FP32_MODEL_ATOL, "loss")
    if head == "Model":
        assert (b.last_hidden_state[~mask.bool()] == 0).all()
        assert type(b) is type(a)


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_and_inputs_embeds(backend, family):
    ref, ours, config = _paired(family, "ForTokenClassification")
    bert_fast.optimize(ours, backend=backend)
    ids, mask, types = _batch(family, [5, 8, 3], config, left=True)
    assert_left_padding_and_embeds(ref, ours, ids, mask, "logits", **_kw(types))


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_position_ids_and_no_mask(family):
    ref, ours, config = _paired(family, "Model")
    ids = torch.randint(2, config.vocab_size, (3, 7))
    pos = torch.randint(0, 40, ids.shape)
    with torch.no_grad():
        a, b = ref(ids), ours(ids)
    assert_close_fp32(b.last_hidden_state, a.last_hidden_state, FP32_MODEL_ATOL, "no mask")
    if "position_ids" not in inspect.signature(type(ref).forward).parameters:
        return  # transformers 4.x DistilBertModel takes no position_ids
    with torch.no_grad():
        c, d = ref(ids, position_ids=pos), ours(ids, position_ids=pos)
    assert_close_fp32(d.last_hidden_state, c.last_hidden_state, FP32_MODEL_ATOL, "explicit position_ids")


def test_roberta_pad_ids_inside_the_mask_follow_hf():
    """RoBERTa derives positions from input_ids, not from the mask: a padding id inside the real tokens
    sits at padding_idx and does not advance the count (HF's rule, reproduced exactly)."""
    ref, ours, config = _paired("roberta", "Model")
    ids, mask, _ = _batch("roberta", [8, 5], config)
    ids[0, 3] = PAD
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, "pad id inside")


def test_electra_without_projection_and_distilbert_sinusoidal():
    for family, over in (("electra", {"embedding_size": 64}), ("distilbert", {"sinusoidal_pos_embds": True})):
        cfg = _config(family, **over)
        ref, ours, _ = _paired(family, "Model", config=cfg)
        if family == "electra":
            assert not hasattr(ours, "embeddings_project")
        ids, mask, types = _batch(family, [7, 3], cfg)
        with torch.no_grad():
            a, b = ref(ids, attention_mask=mask, **_kw(types)), ours(ids, attention_mask=mask, **_kw(types))
        valid = mask.bool()
        assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimize_a_transformers_model_and_revert(family):
    cfg = _config(family)
    torch.manual_seed(0)
    model = getattr(transformers, PREFIX[family] + "ForSequenceClassification")._from_config(
        copy.deepcopy(cfg), attn_implementation="eager"
    ).eval()
    _randomize(model)
    ids, mask, types = _batch(family, [6, 2], cfg)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, **_kw(types)).logits
        assert bert_fast.optimize(model, backend="torch") is model
        assert bert_fast.is_optimized(model)
        assert family_of(model.base_model).name == family
        b = model(ids, attention_mask=mask, **_kw(types)).logits
        bert_fast.revert(model)
        assert not bert_fast.is_optimized(model)
        c = model(ids, attention_mask=mask, **_kw(types)).logits
    assert_close_fp32(b, a, FP32_MODEL_ATOL, "optimized")
    assert torch.equal(c, a)


# --------------------------------------------------------------------------------------------------
# Packed (flattened) input
# --------------------------------------------------------------------------------------------------


def _packed(ids, mask, types):
    """The valid tokens of a right-padded batch as HF's flattened layout."""
    lengths = mask.sum(1)
    valid = mask.bool()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    pos = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    kw = {"input_ids": ids[valid].unsqueeze(0), "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
          "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
    if types is not None:
        kw["token_type_ids"] = types[valid].unsqueeze(0)
    return kw


def _for(model, packed: dict) -> dict | None:
    """transformers 4.x task models pass no extra keywords on: position_ids restarting at 0 alone
    (``None`` when the task model takes no position_ids either: 4.x DistilBERT heads)."""
    if takes_packed_kwargs(model):
        return packed
    if "position_ids" not in inspect.signature(type(model).forward).parameters:
        return None
    return {k: v for k, v in packed.items() if k in ("input_ids", "position_ids", "token_type_ids")}


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_input_matches_padded(backend, family):
    """Packed tokens give what each sequence gives padded (RoBERTa: the padded position rule)."""
    ref, ours, config = _paired(family, "ForTokenClassification")
    bert_fast.optimize(ours, backend=backend)
    ids, mask, types = _batch(family, [6, 9, 1, 4], config)
    valid = mask.bool()
    packed = _packed(ids, mask, types)
    task_kw = _for(ours, packed)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, **_kw(types))
        a_base = ref.base_model(ids, attention_mask=mask, **_kw(types))
        b = ours(**task_kw) if task_kw is not None else None
        base = ours.base_model  # bert_fast's forward: takes the packed keywords on every transformers line
        d = base(**packed, output_hidden_states=True)
        no_pos = base(**{k: v for k, v in packed.items() if k != "position_ids"})  # positions from the offsets
        restarts = {k: v for k, v in packed.items() if k in ("input_ids", "position_ids", "token_type_ids")}
        pos_only = base(**restarts)  # offsets derived from where position_ids restart at 0
    assert_close_fp32(d.last_hidden_state[0], a_base.last_hidden_state[valid], FP32_MODEL_ATOL, "packed base")
    if b is not None:
        assert b.logits.shape[:2] == (1, int(valid.sum()))
        assert_close_fp32(b.logits[0], a.logits[valid], FP32_MODEL_ATOL, "packed token logits")
    assert torch.equal(no_pos.last_hidden_state, d.last_hidden_state)
    assert torch.equal(pos_only.last_hidden_state, d.last_hidden_state)
    assert len(d.hidden_states) == config.num_hidden_layers + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_input_sequence_classification_one_row_per_sequence(family):
    ref, ours, config = _paired(family, "ForSequenceClassification")
    ids, mask, types = _batch(family, [6, 9, 1, 4], config)
    labels = torch.tensor([0, 2, 1, 1])
    task_kw = _for(ours, _packed(ids, mask, types))
    if task_kw is None:
        pytest.skip("this transformers version's task model takes neither packed keywords nor position_ids")
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, labels=labels, **_kw(types))
        b = ours(**task_kw, labels=labels)
    assert_close_fp32(b.logits, a.logits, FP32_MODEL_ATOL, "packed sequence logits")
    assert_close_fp32(b.loss, a.loss, FP32_MODEL_ATOL, "packed sequence loss")


# --------------------------------------------------------------------------------------------------
# Half precision, unsupported variants, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_half_rule(backend, family):
    ref, ours, config = _paired(family, "Model")
    ids, mask, types = _batch(family, [7, 12, 3], config)
    with torch.no_grad():
        ref32 = ref(ids, attention_mask=mask, **_kw(types)).last_hidden_state
        ref16 = copy.deepcopy(ref).to(torch.bfloat16)(ids, attention_mask=mask, **_kw(types)).last_hidden_state
        ours.to(torch.bfloat16)
        bert_fast.optimize(ours, backend=backend)
        got = ours(ids, attention_mask=mask, **_kw(types)).last_hidden_state
    valid = mask.bool()
    assert got.dtype == torch.bfloat16
    assert_half_rule(got[valid], ref16[valid], ref32[valid], HALF_MODEL_FACTOR, f"{family} bf16")


@pytest.mark.parametrize(
    "family,field,value",
    [("roberta", "position_embedding_type", "relative_key"), ("xlm-roberta", "is_decoder", True),
     ("electra", "position_embedding_type", "relative_key_query"), ("camembert", "is_decoder", True),
     ("distilbert", "activation", "silu")],
)
def test_unsupported_variants_raise_naming_the_field(family, field, value):
    cfg = _config(family, **{field: value})
    with pytest.raises(NotImplementedError, match=field):
        getattr(bert_fast, PREFIX[family] + "Model")(copy.deepcopy(cfg))
    hf = getattr(transformers, PREFIX[family] + "Model")._from_config(copy.deepcopy(cfg))
    with pytest.raises(NotImplementedError, match=field):
        bert_fast.optimize(hf)


def test_errors_name_the_argument():
    _, ours, cfg = _paired("distilbert", "Model")
    ids = torch.randint(2, cfg.vocab_size, (2, 5))
    with pytest.raises(ValueError, match="token_type_ids"):
        ours(ids, token_type_ids=torch.zeros_like(ids))
    _, rob, rcfg = _paired("roberta", "Model")
    too_long = torch.randint(2, rcfg.vocab_size, (1, rcfg.max_position_embeddings - PAD))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rob(too_long)
    rob(too_long[:, :-1])  # the longest sequence RoBERTa positions allow
    with pytest.raises(TypeError, match="Roberta"):
        bert_fast.optimize(torch.nn.Linear(2, 2))
