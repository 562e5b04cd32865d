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

Triton kernel (:func:`varlen_attention_fwd`, FlashAttention-2 forward): grid (query blocks of
``max_seqlen``, batch * heads); each program loads a (BLOCK_M, head_dim) query tile once and
streams the sequence's keys and values in BLOCK_N tiles, keeping the running max, the running
denominator and the (BLOCK_M, head_dim) output accumulator in fp32 registers; programs whose
query block starts past their sequence's length exit at once. Scores use ``exp2`` with
``scale * log2(e)`` folded in after the fp32 dot. q, k and v are read through their strides
(token, head; unit stride along head_dim), so views into a fused (N, 3 * hidden) QKV output need
no copy. Limits: head_dim <= 128 (padded to a power of two >= 32 with masks, e.g. 26 -> 32,
80 -> 128), fp16/bf16/fp32 (fp32 dots use ``input_precision="ieee"``: exact fp32 products, no
TF32), ``max_seqlen * token stride < 2^31``; ``max_seqlen`` must be >= every sequence's length
(tokens past it are not computed). Tile sizes, warps and stages are autotuned on the GPU per
head_dim and power-of-two bucket of ``max_seqlen``.

Backends: ``torch`` (:func:`varlen_attention_ref`: re-pads to (B, Lmax) and calls PyTorch SDPA
with a key mask — exact semantics, not fast), ``triton``, ``cpp``. ``dropout_p > 0`` (training)
is served by the reference only. Backward kernels: :mod:`~bert_fast.kernels.attention_backward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend, _dispatch
from . import _triton_utils as _tu
from ._triton_utils import tl, triton
from .attention_backward import BACKWARD as _BACKWARD


def _positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position in sequence) of each packed token."""
    # searchsorted, not repeat_interleave: no data-dependent output size (traceable, no host sync);
    # empty sequences are skipped (right=True counts every end <= the token).
    cu = cu_seqlens.long()
    tokens = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    return seq, tokens - cu[:-1][seq]


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
    if batch * max_seqlen == total:
        # Every sequence has length max_seqlen (no padding): the packed tokens are already a
        # (B, L, heads, d) batch, so no re-padding and no mask are needed.
        def as_batch(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, max_seqlen, heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(as_batch(q), as_batch(k), as_batch(v), dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(total, heads, d).to(dtype)
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


def _triton_support(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p) -> str | None:
    """``None`` when the Triton kernel can serve this call, else the reason it cannot."""
    if dropout_p > 0:
        return "attention dropout is not fused"
    reason = _tu.unsupported_common(q, k, v)
    if reason is not None:
        return reason
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    # Offsets inside one sequence are int32 (the sequence start is int64).
    if max(1, int(max_seqlen)) * max(t.stride(0) for t in (q, k, v)) >= 2**31:
        return "max_seqlen * token stride >= 2^31 (int32 offsets within a sequence)"
    return None


def _cpp_support(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p) -> str | None:
    if dropout_p > 0:
        return "attention dropout is not fused"
    if q.device.type == "cpu":
        return _dispatch.fused_dtypes(q, k, v)
    # The extension has no CUDA attention kernel: under ``cpp`` the GPU runs our Triton kernel.
    if not _backend.triton_usable(q.device):
        return f"the C++ extension has a CPU attention kernel only, and triton is not usable on {q.device}"
    return _triton_support(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)


def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Fake (meta) implementation of ``bert_fast::varlen_attention`` and its Triton custom op."""
    return q.new_empty(q.shape)


def _varlen_attention_cpp(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
    return torch.ops.bert_fast.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)


def _varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
    return varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)


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
    return OP(backend, q, k, v, cu_seqlens, int(max_seqlen), scale, float(dropout_p))


# --- Triton kernels ------------------------------------------------------------------------------


_MAX_HEAD_DIM = 128
#: CUDA's limit on grid dimensions 1 and 2; larger batch * heads are launched in chunks of sequences.
_MAX_GRID_Y = 65535


@_tu.jit
def _varlen_attention_fwd_kernel(
    Q,  # pointer to the queries, shape (N, heads, HEAD_DIM), strides (stride_q_tok, stride_q_head, 1)
    K,  # pointer to the keys, shape (N, heads, HEAD_DIM), strides (stride_k_tok, stride_k_head, 1)
    V,  # pointer to the values, shape (N, heads, HEAD_DIM), strides (stride_v_tok, stride_v_head, 1)
    Out,  # pointer to the output, shape (N, heads, HEAD_DIM), strides (stride_o_tok, stride_o_head, 1)
    CuSeqlens,  # pointer to the sequence offsets, shape (B + 1,), int32/int64
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    num_heads,
    qk_scale,  # softmax scale * log2(e): scores go through exp2
    seqlen_bucket,  # next power of two >= max_seqlen; only an autotune key, unused in the body
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,  # next power of two >= max(HEAD_DIM, 32) (tl.arange; tl.dot needs K >= 16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" (ignored) for 16-bit
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads
    # int64 sequence start before any stride product (N * 3 * hidden may exceed 2^31); offsets
    # within a sequence stay int32 (the launcher checks max_seqlen * stride < 2^31).
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens + seq + 1).to(tl.int64) - start).to(tl.int32)
    if pid_m * BLOCK_M >= seqlen:  # this query block lies past the sequence (or it is empty)
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen
    q_base = Q + start * stride_q_tok + head * stride_q_head
    k_base = K + start * stride_k_tok + head * stride_k_head
    v_base = V + start * stride_v_tok + head * stride_v_head
    # Padded head_dim lanes and rows past the sequence load 0: they add 0 to every dot product.
    q = tl.load(
        q_base + offs_m[:, None] * stride_q_tok + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
    )

    # Running max starts at -inf (not finfo.min): the first key block always holds a valid key
    # (the loop only visits blocks that start inside the sequence), so m_new is finite after the
    # first step, alpha = exp2(-inf - finite) = 0 exactly, and no inf - inf ever occurs.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        # K loaded transposed, (D_PAD, BLOCK_N), straight from the strided view.
        kt = tl.load(
            k_base + cols[None, :] * stride_k_tok + offs_d[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0.0
        )
        # fp32 accumulation of q.k; the scale is applied to the fp32 scores, not to q (no extra
        # rounding of q in half precision).
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        # Keys past the sequence get -inf, i.e. probability exactly 0.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Masked value rows must load 0, not garbage: p = 0 there, but 0 * NaN would be NaN.
        v = tl.load(
            v_base + cols[:, None] * stride_v_tok + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        # P is rounded to the input dtype for the tensor-core PV product (as FlashAttention does);
        # a no-op for fp32. Accumulation stays fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i >= 1 for every valid row (its max term is exp2(0)); the guard only keeps the divide
    # finite in principle, so no NaN can ever be produced.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + start * stride_o_tok + head * stride_o_head + offs_m[:, None] * stride_o_tok + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _attention_head_dim_bucket(head_dim: int) -> int:
    """Padded head_dim: a power of two >= 32 (tl.dot needs K >= 16; head_dim < 32 is rare enough
    that padding it to 32 costs nothing that matters and saves a bucket of compiled kernels)."""
    return max(32, _tu.next_power_of_2(head_dim))


def _attention_configs(d_pad: int, fp32: bool) -> list:
    """Autotune configs (BLOCK_M, BLOCK_N, warps, stages) for one head_dim bucket and precision.

    Chosen from ptxas resource usage (tests/test_triton_aot.py compiles every one for sm_80 and
    sm_90a and fails on spills): 16-bit inputs keep the (BLOCK_M, D_PAD) fp32 accumulator at
    <= 64 values per thread; fp32 inputs with IEEE dots run on FMA units with whole operand tiles
    in registers, so their tiles are much smaller (e.g. 64x32 with 4 warps spills at head_dim 64).
    """
    if fp32:
        # 8 warps: with 4, head_dim 64 (32x32) and 128 (16x32) spill on sm_80 (ptxas stack 8-16 B).
        cands = [(32, 32, 8, 2), (64, 32, 8, 2)] if d_pad <= 64 else [(16, 32, 8, 2), (32, 32, 8, 2)]
    elif d_pad <= 64:
        cands = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)]
    else:
        cands = [(64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in cands]


#: Fixed tiles under the interpreter: small, so the tests' short sequences span several blocks.
_INTERPRET_ATTENTION = {"BLOCK_M": 16, "BLOCK_N": 16}


def _varlen_attention_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton forward of :func:`varlen_attention` (no dropout); returns (N, heads, head_dim), contiguous.

    Arguments are asserted, not validated: :func:`varlen_attention` validates them.
    """
    assert q.dim() == 3 and k.shape == q.shape == v.shape and q.shape[-1] <= _MAX_HEAD_DIM
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    max_seqlen = int(max_seqlen)
    # A unit stride along head_dim is needed for vector loads; the QKV views always have it.
    q, k, v = (t if t.stride(-1) == 1 or head_dim == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return out
    cu = cu_seqlens.contiguous()
    d_pad = _attention_head_dim_bucket(head_dim)
    fp32 = q.dtype == torch.float32
    consts = {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32"}
    seqlen_bucket = _tu.next_power_of_2(max_seqlen)
    kernel, cfg = _tu.tuned(
        _varlen_attention_fwd_kernel, ("seqlen_bucket", "HEAD_DIM"), _attention_configs, d_pad, fp32, rows=total,
        interpret=dict(_INTERPRET_ATTENTION, num_warps=4),
    )  # fmt: skip
    seqs_per_launch = max(1, _MAX_GRID_Y // heads)
    with _tu.device_guard(q.device):
        for first in range(0, batch, seqs_per_launch):
            n_seqs = min(seqs_per_launch, batch - first)

            def grid(meta, n_seqs=n_seqs):
                return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs * heads)

            # cu_seqlens holds absolute offsets, so a chunk of sequences is just a slice of it.
            kernel[grid](
                q, k, v, out, cu[first:],
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
                out.stride(1), heads, float(scale) * 1.4426950408889634, seqlen_bucket,
                **consts, **cfg,
            )  # fmt: skip
    return out


varlen_attention_fwd = _tu.launcher(
    "varlen_attention_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float? scale) -> Tensor",
    _varlen_attention_fwd_impl,
    _varlen_attention_fake,
)


#: head_dims the ahead-of-time compile test builds: BERT's (32, 64, 128) and odd ones per bucket
#: (26 MiniLM/TinyBERT-style, 40, 80) that exercise the head_dim masks.
AOT_HEAD_DIMS = (26, 32, 40, 64, 80, 128)


def aot_specs() -> list[dict]:
    """Every kernel specialization the launcher can choose, for the ahead-of-time compile test.

    ``{dt}`` stands for the q/k/v dtype; ``fp32_only`` / ``half_only`` mark configs used for one
    precision class only (the autotune configs differ for fp32).
    """
    sig = {
        "Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "Out": "*{dt}", "CuSeqlens": "*i32",
        "stride_q_tok": "i32", "stride_q_head": "i32", "stride_k_tok": "i32", "stride_k_head": "i32",
        "stride_v_tok": "i32", "stride_v_head": "i32", "stride_o_tok": "i32", "stride_o_head": "i32",
        "num_heads": "i32", "qk_scale": "fp32", "seqlen_bucket": "i32",
    }  # fmt: skip
    specs = []
    for head_dim in AOT_HEAD_DIMS:
        d_pad = _attention_head_dim_bucket(head_dim)
        for fp32 in (False, True):
            for cfg in _attention_configs(d_pad, fp32):
                label = (f"varlen_attention d={head_dim}(pad {d_pad}) {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} "
                         f"w={cfg.num_warps} s={cfg.num_stages}")  # fmt: skip
                consts = {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32"}
                dtypes = ("fp32",) if fp32 else ("fp16", "bf16")
                specs.append(_tu.aot_spec(label, _varlen_attention_fwd_kernel, sig, {**consts, **cfg.kwargs}, cfg,
                                          dtypes=dtypes))  # fmt: skip
    return specs


_dispatch.register_cpp_fake("varlen_attention", _varlen_attention_fake)

OP = _dispatch.Op(
    "varlen_attention",
    varlen_attention_ref,
    {"triton": _varlen_attention_triton, "cpp": {"cpu": _varlen_attention_cpp, "cuda": _varlen_attention_triton}},
    supports={"triton": _triton_support, "cpp": _cpp_support},
    grad_args=(0, 1, 2),
    backward=_BACKWARD,
)
