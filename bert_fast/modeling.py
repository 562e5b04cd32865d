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
import inspect
import warnings
from typing import Any, NamedTuple

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import _plan
from . import cuda_graphs as _cuda_graphs
from ._inputs import PACKED_KWARGS, check_config, is_packed_by_position_ids, validate_packed, validate_padded
from ._optimize import _FIRST_TOKEN_HEAD, _check_name, check_backend, fam_check_config, is_optimized, optimize, revert
from .families import FAMILIES, Family, LayerParts, family_of

__all__ = [
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
    "optimize",
    "revert",
    "is_optimized",
    "check_config",
]

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


def _dense_residual_layer_norm(plan, dense, w, b, dropout, ln_w, ln_b, eps, h, residual, training: bool):
    """HF's ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + residual)``.

    In eval (or with dropout 0, or no dropout module) the GEMM runs without its bias, which is fused
    into the LayerNorm op; with active dropout, which sits between the biased projection and the
    residual add, the bias stays in the GEMM.
    """
    if training and dropout is not None and dropout.p > 0:
        h = dropout(plan.linear(h, w, b, None))
        return plan.layer_norm(h, ln_w, ln_b, eps, None, residual)
    h = plan.linear(h, w, None, _plan.packer(dense, w))
    return plan.layer_norm(h, ln_w, ln_b, eps, b, residual)


class _Layer(NamedTuple):
    """One layer's modules and Parameters, looked up once (:func:`_layers`), not per forward."""

    attn: torch.nn.Module  # owner of the fused QKV cache
    qkv: tuple  # (w_q, w_k, w_v, b_q, b_k, b_v)
    heads: int
    attn_dropout: float
    attn_out: torch.nn.Module
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    attn_out_dropout: torch.nn.Module | None
    attn_ln: tuple  # (weight, bias, eps)
    ffn_up: torch.nn.Module
    ffn_up_w: torch.Tensor
    ffn_up_b: torch.Tensor
    ffn_down: torch.nn.Module
    ffn_down_w: torch.Tensor
    ffn_down_b: torch.Tensor
    ffn_dropout: torch.nn.Module | None
    ffn_ln: tuple


def _prepare_layer(p: LayerParts, head_dim: int) -> _Layer:
    return _Layer(
        p.attn, (p.query.weight, p.key.weight, p.value.weight, p.query.bias, p.key.bias, p.value.bias),
        p.query.weight.shape[0] // head_dim,  # pruned heads shrink the projections, not head_dim
        p.attn_dropout, p.attn_out, p.attn_out.weight, p.attn_out.bias, p.attn_out_dropout,
        (p.attn_ln.weight, p.attn_ln.bias, p.attn_ln.eps),
        p.ffn_up, p.ffn_up.weight, p.ffn_up.bias, p.ffn_down, p.ffn_down.weight, p.ffn_down.bias, p.ffn_dropout,
        (p.ffn_ln.weight, p.ffn_ln.bias, p.ffn_ln.eps),
    )  # fmt: skip


def _layers(model, fam: Family, config, head_dim: int) -> list[_Layer]:
    """Every layer's :class:`_Layer`, cached until a Parameter, buffer or submodule of any module is
    (re)assigned (:func:`bert_fast._plan.structure_epoch`). Parameters are held as objects: ``.to()``
    and in-place updates change what they hold, not which object they are."""
    table = _plan._table(model)
    epoch = _plan.structure_epoch()
    cached = table.get("layers")
    if cached is None or cached[0] != epoch:
        cached = (epoch, [_prepare_layer(fam.layer(layer, config), head_dim) for layer in fam.layers(model)])
        table["layers"] = cached
    return cached[1]


def _layer_forward(plan, p: _Layer, x: torch.Tensor, cu_seqlens, max_seqlen: int, head_dim: int, act: str,
                   training: bool):
    """One post-LayerNorm encoder layer (:class:`_Layer`: its modules and Parameters)."""
    n = x.shape[0]
    heads = p.heads
    w_qkv, b_qkv = _plan.fused_qkv_of(p.attn, p.qkv)
    qkv = plan.linear(x, w_qkv, b_qkv, _plan.packer(p.attn, w_qkv))
    q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)  # strided views, no copies
    dropout = p.attn_dropout if training else 0.0
    ctx = plan.attention(q, k, v, cu_seqlens, max_seqlen, head_dim**-0.5, dropout).view(n, heads * head_dim)

    x = _dense_residual_layer_norm(
        plan, p.attn_out, p.attn_out_w, p.attn_out_b, p.attn_out_dropout, *p.attn_ln, ctx, x, training
    )
    h = plan.linear(x, p.ffn_up_w, None, _plan.packer(p.ffn_up, p.ffn_up_w))
    h = plan.bias_act(h, p.ffn_up_b, act)
    return _dense_residual_layer_norm(
        plan, p.ffn_down, p.ffn_down_w, p.ffn_down_b, p.ffn_dropout, *p.ffn_ln, h, x, training
    )


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
    for module, layer in zip(fam.layers(model), _layers(model, fam, config, head_dim)):
        if checkpointing and getattr(module, "gradient_checkpointing", False):
            # HF's activation checkpointing (``gradient_checkpointing_enable()`` sets the flag and the
            # function on every layer): the layer's own function (torch.utils.checkpoint, non-reentrant
            # by default, RNG state preserved so dropout masks repeat in the recomputation) wraps our
            # layer; only its input is kept, everything inside is recomputed in backward.
            fn = functools.partial(
                _layer_forward, plan, layer, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, head_dim=head_dim,
                act=act, training=training,
            )  # fmt: skip
            x = module._gradient_checkpointing_func(fn, x)
        else:
            x = _layer_forward(plan, layer, x, cu_seqlens, max_seqlen, head_dim, act, training)
        if all_hidden is not None:
            all_hidden.append(unpack(x))
    sequence_output = all_hidden[-1] if all_hidden is not None else unpack(x)
    return sequence_output, (tuple(all_hidden) if all_hidden is not None else None)


def _embed(plan, model, input_ids, position_ids, token_type_ids, inputs_embeds):
    emb = model.embeddings
    ln = emb.LayerNorm
    return plan.embed(
        input_ids,
        position_ids,
        token_type_ids,
        emb.word_embeddings.weight,
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


def _packed_forward(
    model,
    input_ids,
    attention_mask,
    token_type_ids,
    position_ids,
    inputs_embeds,
    output_hidden_states: bool,
):
    config = model.config
    fam = _family(model)
    act = fam_check_config(fam, config)
    emb = model.embeddings
    device = emb.word_embeddings.weight.device
    _check_types(fam, token_type_ids)
    if position_ids is None:
        position_ids = fam.padded_positions(config, emb, input_ids, inputs_embeds)
    batch, seq_len, position_ids, valid = validate_padded(
        config, emb.position_ids, device, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
    )
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
        model, plan, act, pack(input_ids), pack(position_ids), pack(token_type_ids), pack(inputs_embeds),
        cu_seqlens, max_seqlen, unpack, output_hidden_states,
    )  # fmt: skip
    pooler = getattr(model, "pooler", None)
    pooled = pooler(sequence_output) if pooler is not None else None
    return sequence_output, pooled, hidden


def _packed_input_forward(
    model,
    input_ids,
    attention_mask,
    token_type_ids,
    position_ids,
    inputs_embeds,
    packed: dict,
    validate: bool,
    output_hidden_states: bool,
):
    """HF's flattened layout: (1, T) tokens of several sequences, separated by ``cu_seqlens``.

    The tokens are already packed: no unpad, no gather, no scatter. ``last_hidden_state`` is
    (1, T, H); the pooler reads each sequence's first token, so ``pooler_output`` is (num_seqs, H).
    """
    config = model.config
    fam = _family(model)
    act = fam_check_config(fam, config)
    emb = model.embeddings
    device = emb.word_embeddings.weight.device
    _check_types(fam, token_type_ids)
    head = model.__dict__.get(_FIRST_TOKEN_HEAD)
    if head not in (None, "first"):
        raise NotImplementedError(
            f"packed input (cu_seq_lens_q/k) is not supported for this task model's head ({head}): it pools "
            "outside the encoder; pass padded input"
        )
    total, position_ids, cu_seqlens, max_seqlen = validate_packed(
        config, device, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, packed, validate
    )
    # RoBERTa family: the per-sequence index becomes HF's padded position rule (bert_fast.families).
    position_ids = fam.packed_positions(config, input_ids, position_ids, validate)
    plan = _plan.plan_for(model)

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(total, *t.shape[2:])

    sequence_output, hidden = _embed_encode(
        model, plan, act, flat(input_ids), position_ids, flat(token_type_ids), flat(inputs_embeds), cu_seqlens,
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
        if packed or is_packed_by_position_ids(position_ids, attention_mask, batch):
            seq, pooled, hidden = _packed_input_forward(
                self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, packed,
                bool(validate), bool(output_hidden_states),
            )  # fmt: skip
        else:
            seq, pooled, hidden = _packed_forward(
                self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
            )
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


# --------------------------------------------------------------------------------------------------
# Drop-in classes
# --------------------------------------------------------------------------------------------------


class _DropIn:
    """Shared by the drop-in classes: ``backend=`` and ``cuda_graphs=`` in the constructor and in
    ``from_pretrained``."""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, *args, backend: str | None = None, cuda_graphs: bool = False, sparse_prediction: bool | None = None,
        **kwargs,
    ):
        if backend is not None:
            _check_name(backend)
        model = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        optimize(model, backend=backend, cuda_graphs=cuda_graphs, sparse_prediction=sparse_prediction)
        return model


class BertModel(_FastBertMixin, _DropIn, transformers.BertModel):
    """``transformers.BertModel`` with bert_fast's forward. Same weights, same outputs."""

    def __init__(self, config, *args, backend: str | None = None, cuda_graphs: bool = False, **kwargs):
        check_config(config)
        super().__init__(config, *args, **kwargs)
        self.__dict__["_bert_fast_backend"] = None if backend is None else _check_name(backend)
        check_backend(self, backend)
        _cuda_graphs.set_option(self, cuda_graphs)


class _SparseMLMMixin:
    """Mixed in before ``transformers.BertForMaskedLM`` / ``BertForPreTraining``: sparse MLM prediction.

    When the instance was built or optimized with ``sparse_prediction=True`` and ``labels`` are
    given, the MLM head runs only on labelled positions and its loss is fused with the decoder
    (:mod:`bert_fast._sparse_mlm`); ``logits`` / ``prediction_logits`` then hold only those rows.
    Otherwise transformers' forward runs unchanged.
    """

    def forward(self, *args: Any, **kwargs: Any):
        if not self.__dict__.get("_bert_fast_sparse_prediction"):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        bound = inspect.signature(super().forward).bind(*args, **kwargs)  # type: ignore[misc]
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        labels = call.pop("labels", None)
        if labels is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import MaskedLMOutput
        from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

        from ._sparse_mlm import sparse_mlm

        return_dict = call.pop("return_dict", None)
        next_sentence_label = call.pop("next_sentence_label", None)
        pretraining = isinstance(self, transformers.BertForPreTraining)
        outputs = self.bert(**call, return_dict=True)
        predictions = self.cls.predictions
        mlm_loss, logits = sparse_mlm(predictions, outputs[0], labels)
        if pretraining:
            nsp = self.cls.seq_relationship(outputs[1])
            loss = None
            if next_sentence_label is not None:
                nsp_loss = torch.nn.functional.cross_entropy(nsp.view(-1, 2), next_sentence_label.view(-1))
                loss = mlm_loss + nsp_loss
            out = BertForPreTrainingOutput(
                loss=loss,
                prediction_logits=logits,
                seq_relationship_logits=nsp,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        else:
            out = MaskedLMOutput(
                loss=mlm_loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )
        return out if return_dict is not False else out.to_tuple()


def _sparse_forward_for(base: type):
    """``_SparseMLMMixin.forward`` carrying ``base.forward``'s signature (HF Trainer reads it to decide
    which batch columns the model takes; ``(*args, **kwargs)`` would make it drop them all)."""

    def forward(self, *args: Any, **kwargs: Any):
        return _SparseMLMMixin.forward(self, *args, **kwargs)

    functools.update_wrapper(forward, base.forward)
    return forward


def _base_class(base: type) -> type:
    """The drop-in base model of a family (``RobertaModel``, ``ElectraModel``, ...), as ``BertModel``."""
    fam = family_of(base)

    def __init__(self, config, *args, backend: str | None = None, cuda_graphs: bool = False, **kwargs):
        fam_check_config(fam, config)
        base.__init__(self, config, *args, **kwargs)
        self.__dict__["_bert_fast_backend"] = None if backend is None else _check_name(backend)
        check_backend(self, backend)
        _cuda_graphs.set_option(self, cuda_graphs)

    return type(
        base.__name__,
        (_FastBertMixin, _DropIn, base),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``transformers.{base.__name__}`` with bert_fast's forward. Same weights, same outputs.",
        },
    )


def _task_class(base: type, fam: Family | None = None) -> type:
    sparse = base in (transformers.BertForMaskedLM, transformers.BertForPreTraining)

    def __init__(
        self, config, *args, backend: str | None = None, cuda_graphs: bool = False,
        sparse_prediction: bool | None = None, **kwargs,
    ):  # fmt: skip
        if fam is None:
            check_config(config)
        else:
            fam_check_config(fam, config)
        base.__init__(self, config, *args, **kwargs)
        optimize(self, backend=backend, cuda_graphs=cuda_graphs, sparse_prediction=sparse_prediction)

    return type(
        base.__name__,
        (_DropIn, _SparseMLMMixin, base) if sparse else (_DropIn, base),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``transformers.{base.__name__}`` whose encoder runs bert_fast's forward.",
            **({"forward": _sparse_forward_for(base)} if sparse else {}),
        },
    )


BertForMaskedLM = _task_class(transformers.BertForMaskedLM)
BertForPreTraining = _task_class(transformers.BertForPreTraining)
BertForNextSentencePrediction = _task_class(transformers.BertForNextSentencePrediction)
BertForSequenceClassification = _task_class(transformers.BertForSequenceClassification)
BertForTokenClassification = _task_class(transformers.BertForTokenClassification)
BertForQuestionAnswering = _task_class(transformers.BertForQuestionAnswering)
BertForMultipleChoice = _task_class(transformers.BertForMultipleChoice)


#: transformers base class -> its drop-in (``optimize`` switches an instance's class to it).
DROP_IN_BASES: dict[type, type] = {transformers.BertModel: BertModel}


def _make_family_classes() -> list[str]:
    """The drop-in classes of every non-BERT family present in this transformers version."""
    names = []
    for fam in FAMILIES:
        for name in fam.classes:
            hf_cls = getattr(transformers, name, None)
            if hf_cls is None:
                continue
            cls = _base_class(hf_cls) if name == fam.base else _task_class(hf_cls, fam)
            if name == fam.base:
                DROP_IN_BASES[hf_cls] = cls
            globals()[name] = cls
            names.append(name)
    return names


FAMILY_CLASSES = _make_family_classes()
__all__ += FAMILY_CLASSES
