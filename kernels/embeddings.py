"""Fused embeddings + LayerNorm on packed tokens.

For each of the N real (non-padding) tokens: gather the word row (or take ``inputs_embeds``), add
the token-type row and the position row, LayerNorm the sum — one pass, one (N, H) write. Unfused,
HF materializes three (B, L, H) gathers, two sums and the LayerNorm over *padded* positions.
Bytes: 3 N H gathered + N H written (vs about 9 B L H unfused). Memory-bound.

Order of the sum is HF's: ``(word + token_type) + position``. LayerNorm statistics in fp32,
``eps`` exactly as given. ``token_type_ids=None`` means type 0 for every token (HF's default).

Triton kernel (:func:`embed_layer_norm_fwd`): one program per token, the whole row in registers
(``BLOCK_H`` = next power of two >= H, masked); ids are read as stored (int32 or int64) and widened
to int64 before the row offset. The sum and the LayerNorm statistics are in fp32 (so half-precision
tables are not rounded between the two adds, unlike HF; the order of the adds is HF's). Limits:
H <= 4096, fp16/bf16/fp32 tables, unit stride along H (other layouts are copied first). Ids are
not range-checked. Warp count autotuned per row block and H on the GPU.

Backends: ``torch`` (:func:`embed_layer_norm_ref`), ``triton``, ``cpp``; reference backward under
autograd for the fused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from . import _triton_utils as _tu
from ._autograd import fast_forward_ref_backward
from ._triton_utils import tl


def embed_layer_norm_ref(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    inputs_embeds: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch. ids: (N,) int; ``inputs_embeds``: (N, H) instead of ``input_ids``."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("embed_layer_norm: give input_ids or inputs_embeds")
        inputs_embeds = F.embedding(input_ids, word_embeddings)
    if token_type_ids is None:
        tt = token_type_embeddings[0].expand_as(inputs_embeds)
    else:
        tt = F.embedding(token_type_ids, token_type_embeddings)
    pos = F.embedding(position_ids, position_embeddings)
    dtype = inputs_embeds.dtype
    if upcast:
        inputs_embeds, tt, pos = inputs_embeds.float(), tt.float(), pos.float()
        weight, bias = weight.float(), bias.float()
    h = inputs_embeds + tt
    h = h + pos
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps).to(dtype)


def _triton_support(word_embeddings, position_embeddings, token_type_embeddings, weight, bias, inputs_embeds):
    """``None`` when the Triton kernel can serve this call, else the reason it cannot."""
    reason = _tu.unsupported_common(
        word_embeddings, position_embeddings, token_type_embeddings, weight, bias, inputs_embeds
    )
    if reason is not None:
        return reason
    if word_embeddings.shape[-1] > _tu.MAX_HIDDEN:
        return f"hidden size {word_embeddings.shape[-1]} > {_tu.MAX_HIDDEN} (one row must fit in registers)"
    return None


def embed_layer_norm(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    inputs_embeds: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embeddings + LayerNorm for packed tokens; returns (N, H) in the embeddings' dtype.

    Ids are not range-checked here (a kernel cannot raise); callers validate them first.
    """
    device = word_embeddings.device
    tables = (word_embeddings, position_embeddings, token_type_embeddings, weight, bias, inputs_embeds)
    be = _backend.resolve("embed_layer_norm", device, backend, supports={"triton": _triton_support(*tables)})
    args = (
        input_ids,
        position_ids,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        weight,
        bias,
        inputs_embeds,
    )

    def ref(ii, pi, ti, we, pe, te, w, b, ie):
        return embed_layer_norm_ref(ii, pi, ti, we, pe, te, w, b, eps, inputs_embeds=ie)

    if be == "torch":
        return ref(*args)
    if be == "triton":

        def fast(ii, pi, ti, we, pe, te, w, b, ie):
            return embed_layer_norm_fwd(ii, pi, ti, we, pe, te, w, b, eps, ie)

    else:
        from . import _cpp

        def fast(ii, pi, ti, we, pe, te, w, b, ie):
            return _cpp.embed_layer_norm(ii, pi, ti, we, pe, te, w, b, eps, ie)

    if _backend.needs_grad(*args):
        return fast_forward_ref_backward(fast, ref, *args)
    return fast(*args)


# --- Triton kernels (issue 3) -------------------------------------------------------------------


@_tu.jit
def _embed_layer_norm_fwd_kernel(
    InputIds,  # pointer to the word ids, shape (N,), int32/int64; read iff not HAS_INPUTS_EMBEDS
    InputsEmbeds,  # pointer to the given word vectors, shape (N, H), unit column stride; iff HAS_INPUTS_EMBEDS
    PositionIds,  # pointer to the position ids, shape (N,), int32/int64
    TokenTypeIds,  # pointer to the token type ids, shape (N,), int32/int64; read iff HAS_TOKEN_TYPES
    WordEmb,  # pointer to the word table, shape (V, H), unit column stride
    PosEmb,  # pointer to the position table, shape (P, H), unit column stride
    TypeEmb,  # pointer to the token type table, shape (T, H), unit column stride
    W,  # pointer to the LayerNorm weight, shape (H,)
    B,  # pointer to the LayerNorm bias, shape (H,)
    Y,  # pointer to the output, shape (N, H), unit column stride
    stride_inputs_embeds_row,
    stride_word_row,
    stride_pos_row,
    stride_type_row,
    stride_y_row,
    n_cols,
    eps,
    HAS_INPUTS_EMBEDS: tl.constexpr,
    HAS_TOKEN_TYPES: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride product: N * H may exceed 2^31
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    # Ids widened to int64 before multiplying by the row stride (V * H may exceed 2^31).
    if HAS_INPUTS_EMBEDS:
        word_ptr = InputsEmbeds + row * stride_inputs_embeds_row
    else:
        word_ptr = WordEmb + tl.load(InputIds + row).to(tl.int64) * stride_word_row
    if HAS_TOKEN_TYPES:
        type_ptr = TypeEmb + tl.load(TokenTypeIds + row).to(tl.int64) * stride_type_row
    else:
        type_ptr = TypeEmb  # token_type_ids=None means type 0 (HF's default buffer of zeros)
    pos_ptr = PosEmb + tl.load(PositionIds + row).to(tl.int64) * stride_pos_row
    # fp32 sum in HF's order (word + type) + position; masked lanes load 0 and add nothing.
    h = tl.load(word_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(type_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(pos_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Shifted two-pass statistics from registers. Subtracting the row's first element before
    # summing makes the mean, and so the variance, exact for a constant row: with eps = 1e-12,
    # rstd is ~1e6 there and any rounding left in (h - mean) would be amplified to O(0.1)
    # (PyTorch's Welford LayerNorm gives exactly 0 too). Masked lanes are zeroed each time.
    shift = tl.sum(tl.where(cols == 0, h, 0.0), axis=0)
    hs = tl.where(mask, h - shift, 0.0)
    mean_s = tl.sum(hs, axis=0) / n_cols
    diff = tl.where(mask, hs - mean_s, 0.0)  # = h - mean
    var = tl.sum(diff * diff, axis=0) / n_cols  # biased, as nn.LayerNorm
    rstd = tl.rsqrt(var + eps)  # eps exactly as given (BERT: 1e-12), never clamped
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = diff * rstd * w + b
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)  # one rounding


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _embed_layer_norm_fwd_impl(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    word, pos, types = _rows(word_embeddings), _rows(position_embeddings), _rows(token_type_embeddings)
    n_cols = word.shape[1]
    embeds = _rows(inputs_embeds) if inputs_embeds is not None else None
    n_rows = embeds.shape[0] if embeds is not None else input_ids.shape[0]
    out_dtype = embeds.dtype if embeds is not None else word.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=word.device)
    if n_rows == 0:
        return y
    pos_ids = position_ids.contiguous()
    block = max(_tu.next_power_of_2(n_cols), 16)
    args = (
        input_ids.contiguous() if input_ids is not None else pos_ids,  # dummy pointer when unused
        embeds if embeds is not None else word,  # dummy pointer when unused
        pos_ids,
        token_type_ids.contiguous() if token_type_ids is not None else pos_ids,  # dummy when unused
        word,
        pos,
        types,
        weight.contiguous(),
        bias.contiguous(),
        y,
        embeds.stride(0) if embeds is not None else 0,
        word.stride(0),
        pos.stride(0),
        types.stride(0),
        y.stride(0),
        n_cols,
        float(eps),
    )
    flags = {"HAS_INPUTS_EMBEDS": embeds is not None, "HAS_TOKEN_TYPES": token_type_ids is not None, "BLOCK_H": block}
    if _tu.interpreting():
        _embed_layer_norm_fwd_kernel[(n_rows,)](*args, **flags, num_warps=_tu.INTERPRET_ROW_WARPS)
    else:
        kernel = _tu.autotuned(_embed_layer_norm_fwd_kernel, ("n_cols",), _tu.row_configs, block)
        kernel[(n_rows,)](*args, **flags)
    return y


def _embed_layer_norm_fwd_fake(ii, pi, ti, we, pe, te, w, b, eps, ie):
    n_rows = ie.shape[0] if ie is not None else ii.shape[0]
    dtype = ie.dtype if ie is not None else we.dtype
    return we.new_empty((n_rows, we.shape[1]), dtype=dtype)


_embed_layer_norm_op = _tu.register_op(
    "embed_layer_norm_fwd",
    "(Tensor? input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_embeddings, "
    "Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, Tensor bias, float eps, "
    "Tensor? inputs_embeds) -> Tensor",
    _embed_layer_norm_fwd_impl,
    _embed_layer_norm_fwd_fake,
)


def embed_layer_norm_fwd(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton forward of :func:`embed_layer_norm` for packed tokens; returns (N, H)."""
    if inputs_embeds is None and input_ids is None:
        raise ValueError("embed_layer_norm: give input_ids or inputs_embeds")
    n = inputs_embeds.shape[0] if inputs_embeds is not None else input_ids.shape[0]
    hidden = word_embeddings.shape[1]
    if inputs_embeds is not None and inputs_embeds.shape != (n, hidden):
        raise ValueError(
            f"embed_layer_norm: inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected (N, {hidden})"
        )
    for name, ids in (("input_ids", input_ids), ("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        if ids is not None and (ids.shape != (n,) or ids.is_floating_point()):
            raise ValueError(f"embed_layer_norm: {name} must be integer ids of shape ({n},), got {tuple(ids.shape)}")
    for name, t in (("position_embeddings", position_embeddings), ("token_type_embeddings", token_type_embeddings)):
        if t.dim() != 2 or t.shape[1] != hidden:
            raise ValueError(f"embed_layer_norm: {name} has shape {tuple(t.shape)}, expected (*, {hidden})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (hidden,):
            raise ValueError(f"embed_layer_norm: {name} has shape {tuple(t.shape)}, expected ({hidden},)")
    _tu.check_same_device(
        "embed_layer_norm",
        word_embeddings,
        [
            ("input_ids", input_ids),
            ("position_ids", position_ids),
            ("token_type_ids", token_type_ids),
            ("position_embeddings", position_embeddings),
            ("token_type_embeddings", token_type_embeddings),
            ("weight", weight),
            ("bias", bias),
            ("inputs_embeds", inputs_embeds),
        ],
    )
    if _tu.compiling() and _embed_layer_norm_op is not None:
        return _embed_layer_norm_op(
            input_ids,
            position_ids,
            token_type_ids,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            weight,
            bias,
            float(eps),
            inputs_embeds,
        )
    return _embed_layer_norm_fwd_impl(
        input_ids,
        position_ids,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        weight,
        bias,
        eps,
        inputs_embeds,
    )
