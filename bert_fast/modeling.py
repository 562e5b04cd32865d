"""The drop-in BERT: transformers' ``Bert*`` classes with a padding-free fused forward.

How a forward runs (eval or training, any backend):

1. Validate the inputs (ids in range, lengths within ``max_position_embeddings``, mask shape and
   values, devices) before any kernel runs.
2. Pack: the valid tokens of the (B, L) batch become one (N, hidden) tensor with ``cu_seqlens``
   and ``max_seqlen`` (:func:`bert_fast.kernels.unpad_mask`). A batch without padding skips the
   gather entirely.
3. Resolve the plan (:mod:`bert_fast._plan`): the implementation of every fused op for this
   device, dtype, grad mode and backend, cached per model; no per-op resolution afterwards.
   Embeddings + LayerNorm in one op; then per layer: one fused QKV GEMM, variable-length
   attention reading Q, K, V in place, the output GEMM without bias, fused bias + residual +
   LayerNorm, the FFN-up GEMM without bias, fused bias + activation, the FFN-down GEMM, fused
   bias + residual + LayerNorm.
4. Scatter back to (B, L, hidden). Padded positions of ``last_hidden_state`` and of
   ``hidden_states`` are **zeros** (HF fills them with values computed from padding tokens that
   nobody should read); the pooler reads position 0 as HF does.

Packed input (HF's flattened layout, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
and sentence-transformers' FlashAttention path send it): ``input_ids`` (1, T) or ``inputs_embeds``
(1, T, H), ``position_ids`` restarting at 0 per sequence, ``cu_seq_lens_q/k`` (int32, from 0 to T)
and ``max_length_q/k``, no mask. The tokens are used as they are (no unpad, no scatter);
``last_hidden_state`` is (1, T, H), and the pooler reads each sequence's first token, so
``pooler_output`` and the heads that pool (sequence classification, NSP, multiple choice,
pre-training's NSP) give one row per sequence. Without ``cu_seq_lens_q/k``, a single row with no mask
whose ``position_ids`` restart at 0 is packed input too (HF's flash-attention rule); the offsets are
derived from the restarts. ``validate_inputs=False`` skips the checks that read device values
(offsets, id ranges): with ``cu_seq_lens_q``, ``max_length_q`` and ``position_ids`` given, the
forward then never synchronizes with the device for its inputs.

Under ``torch.compile`` the forward traces without a graph break for unpadded input (no mask) and
for packed input with ``cu_seq_lens_q/k`` and ``max_length_q/k`` given (no autograd recording):
the checks that read device values are skipped while tracing (validation runs in eager, as with
``validate_inputs=False``), the derived weights are computed in the graph and the plan is resolved
outside it (:mod:`bert_fast._plan`). Input with an ``attention_mask`` still breaks the graph where
the token counts are read (to skip the unpad when nothing is padded, and by the unpad itself), as
does packed input whose offsets or longest length must be derived on the host.

In training mode the same path runs with dropout at HF's places and exact gradients. Activation
checkpointing enabled with HF's ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()``
is honoured: each flagged layer is recomputed in backward through the function HF installed on it.

The model never copies or re-creates Parameters: the fused QKV weight is a derived cache built
from the live ``query``/``key``/``value`` weights (rebuilt when any of them changes, kept in a side
table outside the module, so never in ``state_dict``, copies or pickles). In training mode it is
concatenated on the fly so gradients reach the originals.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import _layers, _plan
from . import cuda_graphs as _cuda_graphs
from ._inputs import (
    PACKED_KWARGS,
    Inputs,
    check_config,
    is_packed_by_position_ids,
    reads_values,
    validate_packed,
    validate_padded,
)
from ._optimize import _FIRST_TOKEN_HEAD, fam_check_config, is_optimized, optimize, revert
from .families import Family, family_of

__all__ = ["optimize", "revert", "is_optimized", "check_config"]

_warned: set[str] = set()
#: transformers 4.x (its models' tuple outputs differ in one place: see the end of forward)
_TF4 = int(transformers.__version__.split(".")[0]) < 5


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _family(model) -> Family:
    fam = family_of(model)
    if fam is None:  # pragma: no cover - the fast classes are only ever made for supported bases
        raise TypeError(f"bert_fast: {type(model).__name__} is not a supported encoder")
    return fam


def _check_types(fam: Family, token_type_ids) -> None:
    if token_type_ids is not None and not fam.has_token_types:
        raise ValueError(
            f"token_type_ids given, but {fam.name} models have no token type embeddings; drop the argument"
        )


# --------------------------------------------------------------------------------------------------
# The packed forward
# --------------------------------------------------------------------------------------------------


def _encode(model, plan, act: str, x: torch.Tensor, cu_seqlens, max_seqlen: int, unpack, output_hidden_states: bool):
    """Embedding dropout, the layers, and the (unpacked) hidden states; returns (last, all or None)."""
    training = model.training
    fam, config = _family(model), model.config
    if training:
        x = model.embeddings.dropout(x)
    project = getattr(model, "embeddings_project", None)  # ELECTRA: embedding_size -> hidden_size
    if project is not None:
        x = plan.linear(x, project.weight, project.bias, _plan.packer(project, project.weight))
    all_hidden = [unpack(x)] if output_hidden_states else None
    head_dim = config.hidden_size // config.num_attention_heads
    checkpointing = training and torch.is_grad_enabled()
    for module, layer in zip(fam.layers(model), _layers.layers(model, fam, config, head_dim)):
        if checkpointing and getattr(module, "gradient_checkpointing", False):
            # HF's activation checkpointing (``gradient_checkpointing_enable()`` sets the flag and the
            # function on every layer): the layer's own function (torch.utils.checkpoint, non-reentrant
            # by default, RNG state preserved so dropout masks repeat in the recomputation) wraps our
            # layer; only its input is kept, everything inside is recomputed in backward.
            fn = functools.partial(
                _layers.layer_forward, plan, layer, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, head_dim=head_dim,
                act=act, training=training,
            )  # fmt: skip
            x = module._gradient_checkpointing_func(fn, x)
        else:
            x = _layers.layer_forward(plan, layer, x, cu_seqlens, max_seqlen, head_dim, act, training)
        if all_hidden is not None:
            all_hidden.append(unpack(x))
    sequence_output = all_hidden[-1] if all_hidden is not None else unpack(x)
    return sequence_output, (tuple(all_hidden) if all_hidden is not None else None)


class _NoGradRow(torch.autograd.Function):
    """Identity on an embedding table whose backward zeroes one row's gradient: HF's
    ``nn.Embedding(padding_idx=...)`` never updates the padding row, even where a padding id is
    among the real tokens; the fused embedding backward scatters into every row it reads."""

    @staticmethod
    def forward(ctx, table, row: int):  # type: ignore[override]
        ctx.row = row
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # The incoming gradient is the embedding backward's fresh dense table, used by nothing else:
        # zeroed in place (a clone would hold a second copy, 94 MB in BERT-base, at the end of backward).
        # Anything else (a view, an expanded tensor) is cloned first.
        if grad._is_view() or not grad.is_contiguous():
            grad = grad.clone()
        grad[ctx.row] = 0
        return grad, None


def _word_table(emb) -> torch.Tensor:
    words = emb.word_embeddings
    weight, pad = words.weight, getattr(words, "padding_idx", None)
    if pad is not None and weight.requires_grad and torch.is_grad_enabled():
        return _NoGradRow.apply(weight, pad)
    return weight


def _embed(plan, model, input_ids, position_ids, token_type_ids, inputs_embeds):
    emb = model.embeddings
    ln = emb.LayerNorm
    return plan.embed(
        input_ids,
        position_ids,
        token_type_ids,
        _word_table(emb),
        emb.position_embeddings.weight,
        _family(model).type_table(emb),
        ln.weight,
        ln.bias,
        ln.eps,
        inputs_embeds,
    )


def _embed_encode(
    model, plan, act: str, ids, pos, types, embeds, cu_seqlens, max_seqlen: int, unpack, output_hidden_states: bool
):
    """Embeddings + LayerNorm and the layers on packed tokens; returns (last, all or None).

    Replayed from a captured CUDA graph when :mod:`bert_fast.cuda_graphs` serves the call.
    """
    if _cuda_graphs.OPTION in model.__dict__:

        def encode(ids, pos, types, embeds, cu_seqlens, max_seqlen):
            x = _embed(plan, model, ids, pos, types, embeds)
            return _encode(model, plan, act, x, cu_seqlens, max_seqlen, lambda t: t, False)[0]

        x = _cuda_graphs.encode_packed(
            model, plan, encode, ids, pos, types, embeds, cu_seqlens, max_seqlen, output_hidden_states
        )
        if x is not None:
            return unpack(x), None
    x = _embed(plan, model, ids, pos, types, embeds)
    return _encode(model, plan, act, x, cu_seqlens, max_seqlen, unpack, output_hidden_states)


def _start(model, x: Inputs) -> tuple[Family, str, torch.device]:
    """What both input layouts check first: the family, its activation (the configuration is
    supported) and the model's device; ``token_type_ids`` only for families that have them."""
    fam = _family(model)
    act = fam_check_config(fam, model.config)
    _check_types(fam, x.token_type_ids)
    return fam, act, model.embeddings.word_embeddings.weight.device


def _packed_forward(model, x: Inputs, output_hidden_states: bool):
    """Padded (B, L) input: the valid tokens are packed, run, and scattered back."""
    config = model.config
    fam, act, device = _start(model, x)
    emb = model.embeddings
    if x.position_ids is None:
        x = x._replace(position_ids=fam.padded_positions(config, emb, x.input_ids, x.inputs_embeds))
    batch, seq_len, position_ids, valid = validate_padded(config, emb.position_ids, device, x)
    plan = _plan.plan_for(model)

    # ---- pack --------------------------------------------------------------------------------
    if valid is None or bool(valid.all()):
        indices = None  # no padding: packing is a reshape
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        max_seqlen = seq_len
    else:
        indices, cu_seqlens, max_seqlen = plan.unpad_mask(valid)
        if valid.shape[1] and not bool(valid[:, 0].all()) and getattr(model, "pooler", None) is not None:
            _warn_once(
                "pooler-first-token-padding",
                "bert_fast: some rows start with a padding token; pooler_output of those rows is computed from "
                "the zero vector bert_fast returns at padded positions (HF computes it from the padding token)",
            )

    def pack(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        flat = t.reshape(batch * seq_len, *t.shape[2:])
        return flat if indices is None else plan.gather_rows(flat, indices)

    def unpack(t: torch.Tensor) -> torch.Tensor:
        if indices is not None:
            t = plan.scatter_rows(t, indices, batch * seq_len)
        return t.view(batch, seq_len, -1)

    sequence_output, hidden = _embed_encode(
        model, plan, act, pack(x.input_ids), pack(position_ids), pack(x.token_type_ids), pack(x.inputs_embeds),
        cu_seqlens, max_seqlen, unpack, output_hidden_states,
    )  # fmt: skip
    pooler = getattr(model, "pooler", None)
    pooled = pooler(sequence_output) if pooler is not None else None
    return sequence_output, pooled, hidden


def _packed_input_forward(model, x: Inputs, packed: dict, validate: bool, output_hidden_states: bool):
    """HF's flattened layout: (1, T) tokens of several sequences, separated by ``cu_seqlens``.

    The tokens are already packed: no unpad, no gather, no scatter. ``last_hidden_state`` is
    (1, T, H); the pooler reads each sequence's first token, so ``pooler_output`` is (num_seqs, H).
    """
    config = model.config
    fam, act, device = _start(model, x)
    head = model.__dict__.get(_FIRST_TOKEN_HEAD)
    if head not in (None, "first"):
        raise NotImplementedError(
            f"packed input (cu_seq_lens_q/k) is not supported for this task model's head ({head}): it pools "
            "outside the encoder; pass padded input"
        )
    total, position_ids, cu_seqlens, max_seqlen = validate_packed(config, device, x, packed, validate)
    # RoBERTa family: the per-sequence index becomes HF's padded position rule (bert_fast.families).
    position_ids = fam.packed_positions(config, x.input_ids, position_ids, reads_values(validate))
    plan = _plan.plan_for(model)

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(total, *t.shape[2:])

    sequence_output, hidden = _embed_encode(
        model, plan, act, flat(x.input_ids), position_ids, flat(x.token_type_ids), flat(x.inputs_embeds), cu_seqlens,
        max_seqlen, lambda t: t.view(1, total, -1), output_hidden_states,
    )  # fmt: skip
    pooled = None
    pooler = getattr(model, "pooler", None)
    if pooler is not None or head == "first":
        starts = cu_seqlens[:-1].long()
        # An empty sequence (two equal offsets) has no first token: it pools the zero vector, as an
        # all-padding row of padded input does. No host synchronization.
        nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).unsqueeze(1)
        first = (sequence_output[0].index_select(0, starts.clamp(max=total - 1)) * nonempty).unsqueeze(1)
        if pooler is not None:
            pooled = pooler(first)
        if head == "first":
            # The task head reads position 0 of every row outside the encoder: hand it one row per
            # sequence, (num_seqs, 1, H), so it gives one prediction per packed sequence.
            sequence_output = first
    return sequence_output, pooled, hidden


class _FastBertMixin:
    """Mixed in before ``transformers.BertModel`` (or a subclass of it): replaces ``forward``."""

    def _bert_fast_reference_forward(self, **kwargs):
        """transformers' own forward for this instance (the exact reference path)."""
        return super().forward(**kwargs)  # type: ignore[misc]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        config = self.config
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)

        packed = {k: kwargs.pop(k) for k in PACKED_KWARGS if k in kwargs}
        packed = {k: v for k, v in packed.items() if v is not None}
        validate = kwargs.pop("validate_inputs", True)
        # A loss argument HF Trainer passes to models whose forward takes **kwargs; the BERT task
        # heads pass it down to the encoder, where HF's own forward ignores it too.
        kwargs.pop("num_items_in_batch", None)
        # transformers 4.x task heads pass these explicitly, as None.
        for name in ("head_mask", "cache_position", "past_key_values_length"):
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        reason = None
        if kwargs.get("head_mask") is not None:
            reason = "head_mask masks attention heads, which fused attention does not support"
        elif output_attentions:
            reason = "output_attentions=True needs the attention probabilities, which fused attention never forms"
        elif encoder_hidden_states is not None or encoder_attention_mask is not None or past_key_values is not None:
            reason = "encoder_hidden_states / past_key_values are decoder features"
        elif kwargs:
            reason = f"unsupported keyword arguments {sorted(kwargs)}"
        if reason is not None and packed:
            raise NotImplementedError(
                f"packed input (cu_seq_lens_q/k) cannot run on the transformers reference path ({reason}), whose "
                "eager attention would attend across the packed sequences; drop that argument or pass padded input"
            )
        if reason is not None:
            _warn_once(
                "fallback:" + reason, f"bert_fast: running this call on the transformers reference path ({reason})"
            )
            # Attention probabilities exist only on HF's eager path; use it for this call.
            impl = getattr(config, "_attn_implementation", None)
            if output_attentions and impl not in (None, "eager"):
                config._attn_implementation = "eager"
            given = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
            # Only what the caller gave: not every family's forward takes every BERT argument.
            given = {k: v for k, v in given.items() if v is not None}
            try:
                return self._bert_fast_reference_forward(
                    **given,
                    output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states,
                    return_dict=return_dict,
                    **kwargs,
                )
            finally:
                if output_attentions and impl not in (None, "eager"):
                    config._attn_implementation = impl

        lead = input_ids if input_ids is not None else inputs_embeds
        batch = lead.shape[0] if lead is not None and lead.dim() >= 2 else -1
        x = Inputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        if packed or is_packed_by_position_ids(position_ids, attention_mask, batch):
            seq, pooled, hidden = _packed_input_forward(self, x, packed, bool(validate), bool(output_hidden_states))
        else:
            seq, pooled, hidden = _packed_forward(self, x, bool(output_hidden_states))
        fam = _family(self)
        if fam.output == "BaseModelOutputWithPoolingAndCrossAttentions":
            out = BaseModelOutputWithPoolingAndCrossAttentions(
                last_hidden_state=seq, pooler_output=pooled, hidden_states=hidden
            )
        else:  # no pooler in this family
            out = fam.output_class()(last_hidden_state=seq, hidden_states=hidden)
        if return_dict:
            return out
        if pooled is None and _TF4 and fam.output == "BaseModelOutputWithPoolingAndCrossAttentions":
            return (seq, None) + out.to_tuple()[1:]  # transformers 4.x keeps the missing pooler's None
        return out.to_tuple()


def __getattr__(name: str):
    # The drop-in classes (BertModel, ...) live in bert_fast.classes: they subclass _FastBertMixin above.
    if not name.startswith("__"):
        from . import classes

        if hasattr(classes, name):
            return getattr(classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
