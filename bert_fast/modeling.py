"""The drop-in BERT: transformers' ``Bert*`` classes with a padding-free fused forward.

How a forward runs (eval or training, any backend):

1. Validate the inputs (ids in range, lengths within ``max_position_embeddings``, mask shape and
   values, devices) before any kernel runs.
2. Pack: the valid tokens of the (B, L) batch become one (N, hidden) tensor with ``cu_seqlens``
   and ``max_seqlen`` (:func:`bert_fast.kernels.unpad_mask`). A batch without padding skips the
   gather entirely.
3. Embeddings + LayerNorm in one op; then per layer: one fused QKV GEMM, variable-length
   attention reading Q, K, V in place, the output GEMM without bias, fused bias + residual +
   LayerNorm, the FFN-up GEMM without bias, fused bias + activation, the FFN-down GEMM, fused
   bias + residual + LayerNorm.
4. Scatter back to (B, L, hidden). Padded positions of ``last_hidden_state`` and of
   ``hidden_states`` are **zeros** (HF fills them with values computed from padding tokens that
   nobody should read); the pooler reads position 0 as HF does.

In training mode the same path runs with dropout at HF's places and exact gradients (the fused
kernels are forward-only and get the reference backward).

The model never copies or re-creates Parameters: the fused QKV weight is a derived cache built
from the live ``query``/``key``/``value`` weights (rebuilt when any of them changes, never in
``state_dict``). In training mode it is concatenated on the fly so gradients reach the originals.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import kernels as K
from .kernels._backend import _check_name

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


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Configuration support
# --------------------------------------------------------------------------------------------------


def check_config(config: transformers.PretrainedConfig) -> str:
    """Raise ``NotImplementedError`` naming the field of any configuration we cannot run exactly.

    Returns our activation name for ``config.hidden_act``.
    """
    if getattr(config, "is_decoder", False):
        raise NotImplementedError("bert_fast supports encoders only: config.is_decoder=True is not supported")
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("bert_fast does not support cross-attention (config.add_cross_attention=True)")
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise NotImplementedError(
            f"bert_fast supports absolute position embeddings only: config.position_embedding_type={pet!r}"
        )
    act = getattr(config, "hidden_act", None)
    if not isinstance(act, str) or act not in K.HF_ACTIVATIONS:
        raise NotImplementedError(
            f"bert_fast does not support config.hidden_act={act!r}; supported: {', '.join(K.HF_ACTIVATIONS)}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise NotImplementedError(
            f"config.hidden_size={config.hidden_size} is not a multiple of "
            f"config.num_attention_heads={config.num_attention_heads}"
        )
    return K.HF_ACTIVATIONS[act]


# --------------------------------------------------------------------------------------------------
# Input validation: every bad input is rejected here, before a kernel runs
# --------------------------------------------------------------------------------------------------


def _valid_from_mask(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """A (B, L) bool tensor of real tokens from a 2D 0/1 mask or a 4D additive/bool mask."""
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but the input ids have shape ({batch}, {seq_len})"
            )
        if mask.dtype == torch.bool:
            return mask
        if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            bad = (mask != 0) & (mask != 1)
            if bool(bad.any()):
                value = mask[bad].flatten()[0].item()
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (token); found {value!r}. "
                    "Pass a 4D additive mask of shape (batch, 1, 1, seq_len) for additive masking."
                )
            return mask != 0
        raise ValueError(f"attention_mask has unsupported dtype {mask.dtype}")
    if mask.dim() == 4:
        shape_ok = mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[-1] == seq_len
        if not shape_ok or mask.shape[2] not in (1, seq_len):
            raise ValueError(
                f"4D attention_mask must have shape ({batch}, 1, 1, {seq_len}) or ({batch}, 1, {seq_len}, {seq_len}); "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            keep = mask
        elif mask.is_floating_point():
            # HF's additive convention: 0 keeps a key, a large negative value (finfo.min) masks it.
            masked = mask <= -1e4
            if bool(((mask != 0) & ~masked).any()):
                raise NotImplementedError(
                    "4D attention_mask with values other than 0 (keep) and a large negative number (mask) is an "
                    "additive bias; the padding-free path supports key padding masks only"
                )
            keep = ~masked
        else:
            raise ValueError(f"4D attention_mask has unsupported dtype {mask.dtype}")
        keep = keep[:, 0]
        if keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all()):
            raise NotImplementedError(
                "4D attention_mask varies across query positions; the padding-free path supports key padding "
                "masks only (the same keys for every query)"
            )
        return keep[:, 0]
    raise ValueError(
        f"attention_mask must be 2D (batch, seq_len) or 4D (batch, 1, 1, seq_len); got {mask.dim()}D "
        f"shape {tuple(mask.shape)}"
    )


def _check_ids(name: str, ids: torch.Tensor, limit: int, limit_name: str, shape: tuple[int, int]) -> None:
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {shape}")
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) ({limit_name}={limit})")


# --------------------------------------------------------------------------------------------------
# Fused QKV weights (derived, cached in eval; concatenated under autograd)
# --------------------------------------------------------------------------------------------------


def _version_key(tensors) -> tuple:
    # Inference tensors (made under torch.inference_mode) carry no version counter; their storage
    # identity is the key then.
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)


def _derived(owner: torch.nn.Module, name: str, tensors, build):
    """``build()``, cached on ``owner`` until any of ``tensors`` changes (storage or in-place version)."""
    key = _version_key(tensors)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


def _fused_qkv(self_attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = self_attn.query, self_attn.key, self_attn.value
    tensors = (q.weight, k.weight, v.weight, q.bias, k.bias, v.bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat(tensors[:3]), torch.cat(tensors[3:])
    return _derived(self_attn, "_bert_fast_qkv", tensors, lambda: (torch.cat(tensors[:3]), torch.cat(tensors[3:])))


def _packer(owner: torch.nn.Module, weight: torch.Tensor):
    """A callable giving ``weight`` prepacked for oneDNN, built on first use and cached on ``owner``."""
    return lambda: _derived(owner, "_bert_fast_packed", (weight,), lambda: K.prepack_weight(weight))


# --------------------------------------------------------------------------------------------------
# The packed forward
# --------------------------------------------------------------------------------------------------


def _dense_residual_layer_norm(block, h: torch.Tensor, residual: torch.Tensor, backend, training: bool):
    """HF's ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + residual)``.

    In eval (or with dropout 0) the GEMM runs without its bias, which is fused into the LayerNorm
    op; with active dropout, which sits between the biased projection and the residual add, the
    bias stays in the GEMM.
    """
    dense, ln = block.dense, block.LayerNorm
    if training and block.dropout.p > 0:
        h = block.dropout(K.linear(h, dense.weight, dense.bias, backend=backend))
        return K.bias_residual_layer_norm(h, ln.weight, ln.bias, ln.eps, residual=residual, backend=backend)
    h = K.linear(h, dense.weight, backend=backend, packed=_packer(dense, dense.weight))
    return K.bias_residual_layer_norm(
        h, ln.weight, ln.bias, ln.eps, linear_bias=dense.bias, residual=residual, backend=backend
    )


def _layer_forward(layer, x: torch.Tensor, cu_seqlens, max_seqlen: int, act: str, backend, training: bool):
    attn = layer.attention
    sa = attn.self
    n = x.shape[0]
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size
    hidden = heads * head_dim

    w_qkv, b_qkv = _fused_qkv(sa)
    qkv = K.linear(x, w_qkv, b_qkv, backend=backend, packed=_packer(sa, w_qkv))
    q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)  # strided views, no copies
    ctx = K.varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        scale=sa.scaling,
        dropout_p=sa.dropout.p if training else 0.0,
        backend=backend,
    ).view(n, hidden)

    x = _dense_residual_layer_norm(attn.output, ctx, x, backend, training)

    inter = layer.intermediate.dense
    h = K.linear(x, inter.weight, backend=backend, packed=_packer(inter, inter.weight))
    h = K.bias_act(h, inter.bias, act, backend=backend)

    return _dense_residual_layer_norm(layer.output, h, x, backend, training)


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
    act = check_config(config)
    backend = model.__dict__.get("_bert_fast_backend")
    emb = model.embeddings
    param = emb.word_embeddings.weight
    device = param.device

    # ---- validation --------------------------------------------------------------------------
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len); got {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seq_len, {config.hidden_size}); "
                f"got {tuple(inputs_embeds.shape)}"
            )
        batch, seq_len = inputs_embeds.shape[:2]
    if batch == 0 or seq_len == 0:
        raise ValueError(f"empty batch: inputs have shape ({batch}, {seq_len})")
    named = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
    }
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}; move them to one device")
    max_pos = config.max_position_embeddings
    if position_ids is None:
        if seq_len > max_pos:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's maximum of {max_pos} "
                f"(config.max_position_embeddings={max_pos})"
            )
        position_ids = emb.position_ids[:, :seq_len].expand(batch, seq_len)
    else:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() == 2 and position_ids.shape[0] == 1:
            position_ids = position_ids.expand(batch, -1)
        _check_ids("position_ids", position_ids, max_pos, "config.max_position_embeddings", (batch, seq_len))
    if input_ids is not None:
        _check_ids("input_ids", input_ids, config.vocab_size, "config.vocab_size", (batch, seq_len))
    if token_type_ids is not None:
        _check_ids("token_type_ids", token_type_ids, config.type_vocab_size, "config.type_vocab_size",
                   (batch, seq_len))
    valid = None if attention_mask is None else _valid_from_mask(attention_mask, batch, seq_len)

    # ---- pack --------------------------------------------------------------------------------
    if valid is None or bool(valid.all()):
        indices = None  # no padding: packing is a reshape
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        max_seqlen = seq_len
    else:
        indices, cu_seqlens, max_seqlen = K.unpad_mask(valid, backend=backend)
        if valid.shape[1] and not bool(valid[:, 0].all()) and model.pooler is not None:
            _warn_once(
                "pooler-first-token-padding",
                "bert_fast: some rows start with a padding token; pooler_output of those rows is computed from "
                "the zero vector bert_fast returns at padded positions (HF computes it from the padding token)",
            )

    def pack(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        flat = t.reshape(batch * seq_len, *t.shape[2:])
        return flat if indices is None else K.gather_rows(flat, indices, backend=backend)

    x = K.embed_layer_norm(
        pack(input_ids),
        pack(position_ids),
        pack(token_type_ids),
        emb.word_embeddings.weight,
        emb.position_embeddings.weight,
        emb.token_type_embeddings.weight,
        emb.LayerNorm.weight,
        emb.LayerNorm.bias,
        emb.LayerNorm.eps,
        inputs_embeds=pack(inputs_embeds),
        backend=backend,
    )
    training = model.training
    if training:
        x = emb.dropout(x)

    def unpack(t: torch.Tensor) -> torch.Tensor:
        if indices is not None:
            t = K.scatter_rows(t, indices, batch * seq_len, backend=backend)
        return t.view(batch, seq_len, -1)

    all_hidden = [unpack(x)] if output_hidden_states else None
    for layer in model.encoder.layer:
        x = _layer_forward(layer, x, cu_seqlens, max_seqlen, act, backend, training)
        if all_hidden is not None:
            all_hidden.append(unpack(x))

    sequence_output = all_hidden[-1] if all_hidden is not None else unpack(x)
    pooled = model.pooler(sequence_output) if model.pooler is not None else None
    return sequence_output, pooled, (tuple(all_hidden) if all_hidden is not None else None)


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

        reason = None
        if output_attentions:
            reason = "output_attentions=True needs the attention probabilities, which fused attention never forms"
        elif encoder_hidden_states is not None or encoder_attention_mask is not None or past_key_values is not None:
            reason = "encoder_hidden_states / past_key_values are decoder features"
        elif kwargs:
            reason = f"unsupported keyword arguments {sorted(kwargs)}"
        if reason is not None:
            _warn_once(
                "fallback:" + reason, f"bert_fast: running this call on the transformers reference path ({reason})"
            )
            # Attention probabilities exist only on HF's eager path; use it for this call.
            impl = getattr(config, "_attn_implementation", None)
            if output_attentions and impl not in (None, "eager"):
                config._attn_implementation = "eager"
            try:
                return self._bert_fast_reference_forward(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states,
                    return_dict=return_dict,
                    **kwargs,
                )
            finally:
                if output_attentions and impl not in (None, "eager"):
                    config._attn_implementation = impl

        seq, pooled, hidden = _packed_forward(
            self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=seq, pooler_output=pooled, hidden_states=hidden
        )
        return out if return_dict else out.to_tuple()


# --------------------------------------------------------------------------------------------------
# optimize / revert
# --------------------------------------------------------------------------------------------------

_fast_classes: dict[type, type] = {}


def _fast_class_for(cls: type) -> type:
    if issubclass(cls, _FastBertMixin):
        return cls
    if cls is transformers.BertModel:
        return BertModel
    fast = _fast_classes.get(cls)
    if fast is None:
        fast = type(cls.__name__, (_FastBertMixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        _fast_classes[cls] = fast
    return fast


def _find_bert(model: Any) -> transformers.BertModel:
    """The ``BertModel`` inside ``model`` (itself, a task model's ``.bert``, or a SentenceTransformer's)."""
    if isinstance(model, transformers.BertModel):
        return model
    if isinstance(model, transformers.BertPreTrainedModel) and isinstance(getattr(model, "bert", None),
                                                                          transformers.BertModel):
        return model.bert
    try:  # sentence-transformers: the first module holding a transformers model
        from sentence_transformers import SentenceTransformer
    except Exception:  # pragma: no cover - optional dependency
        SentenceTransformer = None  # noqa: N806
    if SentenceTransformer is not None and isinstance(model, SentenceTransformer):
        for module in model.children():
            inner = getattr(module, "auto_model", None) or getattr(module, "model", None)
            if inner is not None:
                try:
                    return _find_bert(inner)
                except TypeError:
                    break
        raise TypeError("bert_fast.optimize: this SentenceTransformer's first module does not wrap a BERT model")
    raise TypeError(
        f"bert_fast.optimize expects a transformers Bert* model or a SentenceTransformer wrapping one; "
        f"got {type(model).__name__}"
    )


def optimize(model: Any, backend: str | None = None) -> Any:
    """Upgrade ``model`` in place to bert_fast's padding-free fused forward; returns ``model``.

    ``model``: a ``transformers.BertModel``, any transformers ``BertFor*`` task model, or a
    ``SentenceTransformer`` wrapping one. Parameters are shared, not copied; only this instance
    changes (its ``BertModel``'s class is switched to bert_fast's subclass). ``backend``:
    ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``; ``None`` follows
    :func:`bert_fast.use_backend` and ``BERT_FAST_BACKEND``.
    """
    if backend is not None:
        _check_name(backend)
    bert = _find_bert(model)
    check_config(bert.config)
    if not isinstance(bert, _FastBertMixin):
        bert.__dict__["_bert_fast_orig_class"] = type(bert)
        bert.__class__ = _fast_class_for(type(bert))
    bert.__dict__["_bert_fast_backend"] = backend
    return model


def revert(model: Any) -> Any:
    """Undo :func:`optimize`: ``model`` runs transformers' own forward again; returns ``model``."""
    bert = _find_bert(model)
    orig = bert.__dict__.pop("_bert_fast_orig_class", None)
    if orig is None and isinstance(bert, _FastBertMixin):
        # A bert_fast drop-in class: fall back to its transformers base.
        orig = next(
            c for c in type(bert).__mro__ if issubclass(c, transformers.BertModel) and not issubclass(c, _FastBertMixin)
        )
    if orig is not None:
        bert.__class__ = orig
    bert.__dict__.pop("_bert_fast_backend", None)
    for module in bert.modules():
        module.__dict__.pop("_bert_fast_qkv", None)
        module.__dict__.pop("_bert_fast_packed", None)
    return model


def is_optimized(model: Any) -> bool:
    return isinstance(_find_bert(model), _FastBertMixin)


# --------------------------------------------------------------------------------------------------
# Drop-in classes
# --------------------------------------------------------------------------------------------------


class _DropIn:
    """Shared by the drop-in classes: ``backend=`` in the constructor and in ``from_pretrained``."""

    @classmethod
    def from_pretrained(cls, *args, backend: str | None = None, **kwargs):  # type: ignore[override]
        if backend is not None:
            _check_name(backend)
        model = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        optimize(model, backend=backend)
        return model


class BertModel(_FastBertMixin, _DropIn, transformers.BertModel):
    """``transformers.BertModel`` with bert_fast's forward. Same weights, same outputs."""

    def __init__(self, config, *args, backend: str | None = None, **kwargs):
        check_config(config)
        super().__init__(config, *args, **kwargs)
        self.__dict__["_bert_fast_backend"] = None if backend is None else _check_name(backend)


def _task_class(base: type) -> type:
    def __init__(self, config, *args, backend: str | None = None, **kwargs):
        check_config(config)
        base.__init__(self, config, *args, **kwargs)
        optimize(self, backend=backend)

    return type(
        base.__name__,
        (_DropIn, base),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``transformers.{base.__name__}`` whose encoder runs bert_fast's forward.",
        },
    )


BertForMaskedLM = _task_class(transformers.BertForMaskedLM)
BertForPreTraining = _task_class(transformers.BertForPreTraining)
BertForNextSentencePrediction = _task_class(transformers.BertForNextSentencePrediction)
BertForSequenceClassification = _task_class(transformers.BertForSequenceClassification)
BertForTokenClassification = _task_class(transformers.BertForTokenClassification)
BertForQuestionAnswering = _task_class(transformers.BertForQuestionAnswering)
BertForMultipleChoice = _task_class(transformers.BertForMultipleChoice)
