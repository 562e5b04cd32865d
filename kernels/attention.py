"""Variable-length (padding-free) multi-head self-attention over packed tokens.

Inputs are the packed tokens of a batch: ``q``, ``k``, ``v`` of shape (N, heads, head_dim), usually
strided views straight into the fused QKV projection's (N, 3 * hidden) output (no transpose, no
copy), and ``cu_seqlens`` (B + 1,) int32 with the start of each sequence. Each token attends only
to the tokens of its own sequence, so padding costs nothing.

FLOPs: 4 * sum_i(L_i^2) * hidden (QK^T and PV). Fewest bytes: read Q, K, V once and write O once,
4 N hidden elements, when the score matrix is never materialized (flash-style online softmax, the
Triton kernel) — a (heads, L, L) score tile per sequence otherwise.

Numerics: softmax in fp32 with the running max subtracted; a sequence of length 0 has no query
rows (nothing is computed or written); no value ever becomes NaN (the denominator is guarded).

Backends: ``torch`` (:func:`varlen_attention_ref`: re-pads to (B, Lmax) and calls PyTorch SDPA
with a key mask — exact semantics, not fast), ``triton``, ``cpp``. ``dropout_p > 0`` (training)
is served by the reference only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._autograd import fast_forward_ref_backward


def _positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position in sequence) of each packed token."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens.long())
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return seq, pos


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch oracle. q, k, v: (N, heads, d); returns (N, heads, d) contiguous."""
    total, heads, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = cu_seqlens.numel() - 1
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if total == 0:
        return q.new_zeros((0, heads, d)).to(dtype)
    seq, pos = _positions(cu_seqlens, total)

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((batch, max_seqlen, heads, d))
        out[seq, pos] = t
        return out.transpose(1, 2)  # (B, heads, L, d)

    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    key_valid = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]
    # Additive mask with finfo.min (as HF does), not -inf: a row with no valid key gets a uniform
    # distribution instead of NaN. Such rows only occur at padded query positions, never gathered.
    mask = torch.zeros((batch, 1, 1, max_seqlen), dtype=q.dtype, device=q.device)
    mask.masked_fill_(~key_valid[:, None, None, :], torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[seq, pos].to(dtype)


def _check(q, k, v, cu_seqlens) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"varlen_attention: q, k, v must share one (tokens, heads, head_dim) shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D tensor of batch + 1 offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError("varlen_attention: q, k, v and cu_seqlens must be on one device")


def _triton_support(q: torch.Tensor, dropout_p: float) -> str | None:
    if globals().get("varlen_attention_fwd") is None:
        return "Triton kernel not available in this build"
    if dropout_p > 0:
        return "attention dropout is not fused"
    check = globals().get("_triton_unsupported")
    return check(q) if check is not None else None


def _cpp_support(q: torch.Tensor, dropout_p: float) -> str | None:
    return "attention dropout is not fused" if dropout_p > 0 else None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence; returns (N, heads, head_dim), contiguous."""
    _check(q, k, v, cu_seqlens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    be = _backend.resolve(
        "varlen_attention",
        q.device,
        backend,
        supports={"triton": _triton_support(q, dropout_p), "cpp": _cpp_support(q, dropout_p)},
    )

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)

    if be == "torch":
        return ref(q, k, v)
    if be == "triton":

        def fast(q, k, v):
            return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)  # noqa: F821

    else:
        from . import _cpp

        def fast(q, k, v):
            return _cpp.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)

    if _backend.needs_grad(q, k, v):
        return fast_forward_ref_backward(fast, ref, q, k, v)
    return fast(q, k, v)


# --- Triton kernels (issue 3) -------------------------------------------------------------------
