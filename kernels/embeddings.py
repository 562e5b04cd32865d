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

Backends: ``torch`` (:func:`embed_layer_norm_ref`), ``triton``, ``cpp``; backward kernels (Triton, C++ on CPU)
in :mod:`~bert_fast.kernels.embeddings_backward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch
from . import _triton_utils as _tu
from ._triton_utils import tl
from .embeddings_backward import BACKWARD as _BACKWARD


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


def _triton_support(ii, pi, ti, word_embeddings, position_embeddings, token_type_embeddings, weight, bias, eps,
                    inputs_embeds) -> str | None:
    """``None`` when the Triton kernel can serve this call, else the reason it cannot."""
    tables = (word_embeddings, position_embeddings, token_type_embeddings, weight, bias)
    return _tu.unsupported_rows(word_embeddings.shape[-1], *tables, inputs_embeds)


def _embed_layer_norm_fake(ii, pi, ti, we, pe, te, w, b, eps, ie=None):
    """Fake (meta) implementation of ``bert_fast::embed_layer_norm`` and its Triton custom op."""
    n_rows = pi.shape[0] if pi.dim() == 1 else pi.numel()
    dtype = ie.dtype if ie is not None else we.dtype
    return we.new_empty((n_rows, we.shape[1]), dtype=dtype)


def _embed_layer_norm_cpp(ii, pi, ti, we, pe, te, w, b, eps, ie):
    return torch.ops.bert_fast.embed_layer_norm(ii, pi, ti, we, pe, te, w, b, eps, ie)


def _check(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings,
           weight, bias, inputs_embeds) -> None:
    if inputs_embeds is None and input_ids is None:
        raise ValueError("embed_layer_norm: give input_ids or inputs_embeds")
    n = position_ids.shape[0]
    hidden = word_embeddings.shape[1]
    if inputs_embeds is not None and inputs_embeds.shape != (n, hidden):
        raise ValueError(
            f"embed_layer_norm: inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected ({n}, {hidden})"
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
    named = (
        ("input_ids", input_ids), ("position_ids", position_ids), ("token_type_ids", token_type_ids),
        ("position_embeddings", position_embeddings), ("token_type_embeddings", token_type_embeddings),
        ("weight", weight), ("bias", bias), ("inputs_embeds", inputs_embeds),
    )  # fmt: skip
    for name, t in named:
        if t is not None and t.device != word_embeddings.device:
            raise ValueError(f"embed_layer_norm: {name} is on {t.device}, expected {word_embeddings.device}")


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

    Shapes, dtypes and devices are validated here; id ranges are not (a GPU kernel cannot raise;
    the C++ CPU kernel checks them, the model validates them before any kernel runs).
    """
    tables = (word_embeddings, position_embeddings, token_type_embeddings, weight, bias)
    _check(input_ids, position_ids, token_type_ids, *tables, inputs_embeds)
    return OP(backend, input_ids, position_ids, token_type_ids, *tables, float(eps), inputs_embeds)


# --- Triton kernels ------------------------------------------------------------------------------


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
    y = _tu.layer_norm_row(h, cols, mask, n_cols, W, B, eps)  # two-pass fp32 statistics, eps as given
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
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton forward of :func:`embed_layer_norm` for packed tokens; returns (N, H).

    Arguments are asserted, not validated: :func:`embed_layer_norm` validates them.
    """
    assert (input_ids is not None or inputs_embeds is not None) and position_ids.dim() == 1
    word, pos, types = _rows(word_embeddings), _rows(position_embeddings), _rows(token_type_embeddings)
    n_cols = word.shape[1]
    embeds = _rows(inputs_embeds) if inputs_embeds is not None else None
    n_rows = embeds.shape[0] if embeds is not None else input_ids.shape[0]
    out_dtype = embeds.dtype if embeds is not None else word.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=word.device)
    if n_rows == 0:
        return y
    pos_ids = position_ids.contiguous()
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
    flags = {"HAS_INPUTS_EMBEDS": embeds is not None, "HAS_TOKEN_TYPES": token_type_ids is not None}
    _tu.launch_rows(_embed_layer_norm_fwd_kernel, args, flags, n_rows, n_cols, y.device)
    return y


embed_layer_norm_fwd = _tu.launcher(
    "embed_layer_norm_fwd",
    "(Tensor? input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_embeddings, "
    "Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, Tensor bias, float eps, "
    "Tensor? inputs_embeds) -> Tensor",
    _embed_layer_norm_fwd_impl,
    _embed_layer_norm_fake,
)


def aot_specs() -> list[dict]:
    """Every kernel specialization the launcher can choose, for the ahead-of-time compile test.

    Entries as :func:`~bert_fast.kernels._triton_utils.row_aot_specs` lists them; ``{dt}`` stands for
    the table dtype, ``{it}`` for the id dtype. The heaviest variant gathers ids and token types.
    """
    sig = {
        "InputIds": "*{it}", "InputsEmbeds": "*{dt}", "PositionIds": "*{it}", "TokenTypeIds": "*{it}",
        "WordEmb": "*{dt}", "PosEmb": "*{dt}", "TypeEmb": "*{dt}", "W": "*{dt}", "B": "*{dt}",
        "Y": "*{dt}", "stride_inputs_embeds_row": "i32", "stride_word_row": "i32",
        "stride_pos_row": "i32", "stride_type_row": "i32", "stride_y_row": "i32", "n_cols": "i32",
        "eps": "fp32",
    }  # fmt: skip
    flags = {"HAS_INPUTS_EMBEDS": "embeds", "HAS_TOKEN_TYPES": "types"}
    variants = [(False, True), (False, False), (True, True), (True, False)]
    return _tu.row_aot_specs("embed_layer_norm", _embed_layer_norm_fwd_kernel, sig, flags, variants)


_dispatch.register_cpp_fake("embed_layer_norm", _embed_layer_norm_fake)

OP = _dispatch.Op(
    "embed_layer_norm",
    embed_layer_norm_ref,
    {"triton": embed_layer_norm_fwd, "cpp": _embed_layer_norm_cpp},
    supports={"triton": _triton_support, "cpp": _dispatch.fused_dtypes},
    device_arg=3,
    grad_args=(3, 4, 5, 6, 7, 9),
    backward=_BACKWARD,
)
