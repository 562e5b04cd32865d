"""The BERT family: one padding-free forward, one small adapter per architecture.

BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA and DistilBERT are the same post-LayerNorm encoder
(embeddings + LayerNorm; per layer self-attention, output projection, residual + LayerNorm, FFN,
residual + LayerNorm). They differ only in

* **module names** — BERT's ``attention.self.query`` / ``attention.output.dense`` /
  ``intermediate.dense`` / ``output.dense`` versus DistilBERT's ``attention.q_lin`` / ``out_lin`` /
  ``sa_layer_norm`` / ``ffn.lin1`` / ``ffn.lin2`` / ``output_layer_norm`` (:meth:`Family.layer`
  maps a layer to :class:`LayerParts`);
* **embeddings** — token types or none (DistilBERT: a zero type row is added, which is exact);
  ELECTRA's ``embedding_size`` with the ``embeddings_project`` linear after the embedding
  LayerNorm;
* **position ids** — BERT, ELECTRA and DistilBERT count from 0; the RoBERTa family derives them
  from ``input_ids`` as HF does (``cumsum(ids != padding_idx) * (ids != padding_idx) +
  padding_idx``, so real tokens start at ``padding_idx + 1`` and padding tokens sit at
  ``padding_idx``), or sequentially from ``padding_idx + 1`` for ``inputs_embeds``;
* **configuration field names** (``activation`` / ``hidden_dim`` / ``attention_dropout`` for
  DistilBERT) and the output class of the base model.

DistilBERT's ``sinusoidal_pos_embds=True`` only changes how the position table is initialized (and
freezes it): the forward is a table lookup either way, so it is supported as is.

Packed input (HF's flattened layout) for the RoBERTa family: the packed ``position_ids`` (given,
or derived from ``cu_seq_lens_q``) are read as each token's index in its own sequence, and the
RoBERTa rule is applied per sequence, so every sequence gets exactly the positions it gets when run
alone padded (``padding_idx + 1 + index`` for real tokens). HF's FlashAttention path instead looks
the given ``position_ids`` up unchanged (positions 0, 1, ... that a RoBERTa checkpoint never saw in
pre-training); bert_fast follows the padded semantics so packed and padded calls agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import transformers
from transformers import modeling_outputs

__all__ = [
    "Family", "LayerParts", "FAMILIES", "family_of", "find_base_model", "supported_model_types", "takes_packed_kwargs",
]


class LayerParts(NamedTuple):
    """One encoder layer, as the fused forward sees it (every architecture maps onto this)."""

    attn: torch.nn.Module  # owner of the fused QKV cache
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    attn_dropout: float  # attention-probability dropout (training only)
    attn_out: torch.nn.Linear
    attn_out_dropout: torch.nn.Module | None  # dropout after the output projection (None: none)
    attn_ln: torch.nn.LayerNorm
    ffn_up: torch.nn.Linear
    ffn_down: torch.nn.Linear
    ffn_dropout: torch.nn.Module | None
    ffn_ln: torch.nn.LayerNorm


def _bert_layer(layer: torch.nn.Module, config: Any) -> LayerParts:
    attn = layer.attention
    sa = attn.self
    return LayerParts(
        sa, sa.query, sa.key, sa.value, config.attention_probs_dropout_prob,
        attn.output.dense, attn.output.dropout, attn.output.LayerNorm,
        layer.intermediate.dense, layer.output.dense, layer.output.dropout, layer.output.LayerNorm,
    )  # fmt: skip


def _distilbert_layer(layer: torch.nn.Module, config: Any) -> LayerParts:
    sa, ffn = layer.attention, layer.ffn
    return LayerParts(
        sa, sa.q_lin, sa.k_lin, sa.v_lin, config.attention_dropout,
        sa.out_lin, None, layer.sa_layer_norm,
        ffn.lin1, ffn.lin2, ffn.dropout, layer.output_layer_norm,
    )  # fmt: skip


@dataclass(frozen=True)
class Family:
    """What differs between the architectures that share bert_fast's forward."""

    name: str
    #: transformers class name of the base model (looked up lazily: absent classes are skipped)
    base: str
    model_types: tuple[str, ...]
    #: transformers task classes that get a drop-in subclass (base model first)
    classes: tuple[str, ...]
    #: the attribute of the base model holding the layers' container, and its list attribute
    layers_path: tuple[str, str]
    act_field: str
    #: RoBERTa's position ids (padding_idx offset, derived from input_ids)
    padding_positions: bool
    has_token_types: bool
    #: task classes whose head reads position 0 of ``last_hidden_state`` outside the base model
    first_token_heads: tuple[str, ...]
    output: str

    # -- structure --------------------------------------------------------------------------------

    def layers(self, model: torch.nn.Module):
        container, attr = self.layers_path
        return getattr(getattr(model, container), attr)

    def layer(self, layer: torch.nn.Module, config: Any) -> LayerParts:
        return _distilbert_layer(layer, config) if self.layers_path[0] == "transformer" else _bert_layer(layer, config)

    def attn_dropout(self, config: Any) -> float:
        return config.attention_dropout if self.layers_path[0] == "transformer" else config.attention_probs_dropout_prob

    def intermediate_size(self, config: Any) -> int:
        return config.hidden_dim if self.layers_path[0] == "transformer" else config.intermediate_size

    def activation(self, config: Any) -> Any:
        return getattr(config, self.act_field, None)

    def output_class(self) -> type:
        return getattr(modeling_outputs, self.output)

    # -- embeddings -------------------------------------------------------------------------------

    def type_table(self, emb: torch.nn.Module) -> torch.Tensor:
        """The token-type table; for a family without token types, one zero row (adding it is exact)."""
        if self.has_token_types:
            return emb.token_type_embeddings.weight
        from . import _plan

        word = emb.word_embeddings.weight
        return _plan.derived(emb, "zero_types", (word,), lambda: word.new_zeros((1, word.shape[1])))

    def padded_positions(
        self, config: Any, emb: torch.nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Default position ids of a padded (B, L) call (``None``: the model's ``0..L-1`` buffer)."""
        if not self.padding_positions:
            return None
        pad = int(config.pad_token_id)
        lead = input_ids if input_ids is not None else inputs_embeds
        if lead is None or lead.dim() < 2 or lead.shape[0] == 0 or lead.shape[1] == 0:
            return None  # the input validation reports the bad shape
        if input_ids is None:
            batch, seq_len = inputs_embeds.shape[:2]
            _check_length(config, seq_len, pad)
            pos = torch.arange(pad + 1, seq_len + pad + 1, dtype=torch.long, device=inputs_embeds.device)
            return pos.unsqueeze(0).expand(batch, seq_len)
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            return None  # the input validation reports the dtype
        if input_ids.shape[1] + pad >= config.max_position_embeddings:
            # The longest real row decides (padding tokens do not advance the position).
            _check_length(config, int((input_ids != pad).sum(1).max()), pad)
        # HF's create_position_ids_from_input_ids, cast for cast.
        mask = input_ids.ne(pad).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad

    def packed_positions(
        self,
        config: Any,
        input_ids: torch.Tensor | None,
        index: torch.Tensor,
        validate: bool,
    ) -> torch.Tensor:
        """Position ids of packed (T,) tokens, from each token's ``index`` in its own sequence."""
        if not self.padding_positions:
            return index
        pad = int(config.pad_token_id)
        if input_ids is None:
            pos = index + (pad + 1)
        else:
            # Per sequence, the padded rule: count the non-padding tokens of the sequence so far.
            ids = input_ids.reshape(-1)
            mask = ids.ne(pad).long()
            counts = torch.cumsum(mask, 0)
            start = torch.arange(ids.numel(), device=ids.device) - index
            before = counts.index_select(0, start) - mask.index_select(0, start)
            pos = (counts - before) * mask + pad
        if validate:
            hi = int(pos.max())
            if hi >= config.max_position_embeddings:
                _check_length(config, hi - pad, pad)
        return pos


def _check_length(config: Any, length: int, pad: int) -> None:
    limit = config.max_position_embeddings - pad - 1
    if length > limit:
        raise ValueError(
            f"sequence length {length} exceeds the model's maximum of {limit} (config.max_position_embeddings="
            f"{config.max_position_embeddings} minus padding_idx + 1 = {pad + 1}: RoBERTa-style positions start "
            "after the padding index)"
        )


#: The task heads transformers defines for most families, base model first.
_HEADS = (
    "Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
    "ForMultipleChoice",
)  # fmt: skip


def _family(
    name: str,
    prefix: str,
    heads: tuple[str, ...] = _HEADS,
    first_token_heads: tuple[str, ...] = ("ForSequenceClassification",),
    **fields: Any,
) -> Family:
    """The family whose transformers classes are ``<prefix><head>`` (base ``<prefix>Model``, model type
    ``name``), laid out as BERT is unless ``fields`` say otherwise."""
    layout: dict[str, Any] = dict(
        layers_path=("encoder", "layer"),
        act_field="hidden_act",
        padding_positions=False,
        has_token_types=True,
        output="BaseModelOutputWithPoolingAndCrossAttentions",
    )
    return Family(
        name=name,
        base=f"{prefix}Model",
        model_types=(name,),
        classes=tuple(prefix + h for h in heads),
        first_token_heads=tuple(prefix + h for h in first_token_heads),
        **{**layout, **fields},
    )


FAMILIES: tuple[Family, ...] = (
    # the BERT drop-ins are written out in bert_fast.classes
    _family("bert", "Bert", heads=(), first_token_heads=()),
    _family("roberta", "Roberta", padding_positions=True),
    _family("xlm-roberta", "XLMRoberta", padding_positions=True),
    _family("camembert", "Camembert", padding_positions=True),
    _family(
        "electra",
        "Electra",
        heads=("Model", "ForPreTraining", *_HEADS[1:]),
        first_token_heads=("ForSequenceClassification", "ForMultipleChoice"),
        output="BaseModelOutputWithPastAndCrossAttentions",
    ),
    _family(
        "distilbert",
        "DistilBert",
        first_token_heads=("ForSequenceClassification", "ForMultipleChoice"),
        layers_path=("transformer", "layer"),
        act_field="activation",
        has_token_types=False,
        output="BaseModelOutput",
    ),
)

_by_type: dict[type, Family | None] = {}


def _bases() -> list[tuple[type, Family]]:
    return [(getattr(transformers, f.base), f) for f in FAMILIES if hasattr(transformers, f.base)]


def family_of(model: Any) -> Family | None:
    """The family of a base model instance or class (``None`` if it is none of ours)."""
    cls = model if isinstance(model, type) else type(model)
    if cls not in _by_type:
        found = None
        for base, fam in _bases():
            if issubclass(cls, base):
                found = fam
                break
        _by_type[cls] = found
    return _by_type[cls]


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES for t in f.model_types)


def find_base_model(model: Any) -> torch.nn.Module | None:
    """The supported base model inside a transformers model (itself or its ``base_model``)."""
    if family_of(model) is not None:
        return model
    if isinstance(model, transformers.PreTrainedModel):
        inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if inner is not None and family_of(inner) is not None:
            return inner
    return None


def takes_packed_kwargs(model: Any) -> bool:
    """Whether ``model``'s forward passes extra keyword arguments (``cu_seq_lens_q/k``, ...) on to the
    encoder. transformers 4.x task models take none: packed input reaches them only as
    ``position_ids`` restarting at 0 in one unmasked row (the offsets are derived from the restarts)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def first_token_head(task_model: Any) -> str | None:
    """``"first"`` when ``task_model``'s head reads position 0 of each row of ``last_hidden_state``
    outside the base model (so packed input must hand it one row per sequence); ``None`` otherwise."""
    for cls in type(task_model).__mro__:
        for fam in FAMILIES:
            if cls.__name__ in fam.first_token_heads and cls.__module__.startswith("transformers."):
                summary = getattr(task_model.config, "summary_type", "first")
                if fam.name == "electra" and "MultipleChoice" in cls.__name__ and summary != "first":
                    return f"summary_type={summary!r}"
                return "first"
    return None
