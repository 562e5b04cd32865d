"""Backward of variable-length attention (:func:`~bert_fast.kernels.attention.varlen_attention`).

Per packed sequence and head, with ``P = softmax(scale Q K^T)`` and ``O = P V``:
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``,
``dQ = scale dS K``, ``dK = scale dS^T Q``. The forward saves only q, k, v (no O, no softmax
statistics), so the backward recomputes what it needs. Masking is the forward's: a token sees only
the keys of its own sequence; a sequence of length 0 has no rows and gets nothing written.

FLOPs: the five L x L x d GEMMs (10 sum_i L_i^2 d per head), plus the recompute of the forward
(4 L^2 d) in the Triton path. Bytes: read q, k, v, dO, write dq, dk, dv (7 N hidden elements) and,
in Triton, two fp32 per token and head (LSE and D); the L x L scores are never stored.

Kernels:

* C++ (CPU), ``bert_fast::varlen_attention_bwd`` (``csrc/cpu/varlen_attention_bwd.cpp``): one task per
  (sequence, head), the formulas above as ATen GEMMs on the sequence's slices (the BLAS PyTorch
  links), P recomputed in fp32, tasks dealt longest-first to the threads; each task writes its own
  slices, so the result does not depend on the thread count.
* Triton, FlashAttention-2's backward in three kernels, grids (blocks of ``max_seqlen``,
  batch * heads) as the forward, programs past their sequence's length exit at once:
  ``_attn_bwd_preprocess_kernel`` (per query block) recomputes the forward's online softmax to get
  O and the row's log-sum-exp (base 2), and stores LSE and ``D = rowsum(dO * O)`` (fp32);
  ``_attn_bwd_dkdv_kernel`` (per key block) keeps its K, V tiles and the dK, dV accumulators in
  registers and loops over the sequence's query blocks, recomputing ``P = exp2(S - LSE)``;
  ``_attn_bwd_dq_kernel`` (per query block) loops over the key blocks for dQ. No atomics: the result
  is deterministic. Limits as the forward: head_dim <= 128 (padded to a power of two >= 32 with
  masks), fp16/bf16/fp32, unit stride along head_dim.

Numerics: scores, softmax, D and every accumulator in fp32; fp32 dots with
``input_precision="ieee"`` (no TF32); for 16-bit inputs P and dS are rounded to the input dtype for
the tensor-core GEMMs (as FlashAttention does), accumulation stays fp32, one rounding per output.
Masked rows and columns get P = 0 before any product, so out-of-sequence data never contributes.
"""

from __future__ import annotations

import torch

from . import _dispatch
from . import _triton_utils as _tu
from ._triton_utils import tl, triton

#: CUDA's limit on grid dimension 1: larger batch * heads are launched in chunks of sequences.
_MAX_GRID_Y = 65535
_LOG2E = 1.4426950408889634


def _bwd_cpp(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0):
    assert dropout_p == 0.0
    return torch.ops.bert_fast.varlen_attention_bwd(grad, q, k, v, cu_seqlens, int(max_seqlen), float(scale))


_bwd_cpp.available = lambda: hasattr(torch.ops.bert_fast, "varlen_attention_bwd")  # type: ignore[attr-defined]


def varlen_attention_bwd_fake(grad, q, k, v, cu_seqlens, max_seqlen, scale):
    """Fake (meta) implementation of ``bert_fast::varlen_attention_bwd``."""
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


# --- Triton kernels ------------------------------------------------------------------------------


@_tu.jit
def _attn_bwd_preprocess_kernel(
    Q,  # pointer to the queries, shape (N, heads, HEAD_DIM), strides (stride_q_tok, stride_q_head, 1)
    K,  # pointer to the keys, same layout with stride_k_*
    V,  # pointer to the values, same layout with stride_v_*
    DO,  # pointer to the output gradient, shape (N, heads, HEAD_DIM), strides (stride_do_tok, stride_do_head, 1)
    LSE,  # pointer to the row log-sum-exp (base 2, scaled scores), fp32, shape (N, heads), contiguous
    Delta,  # pointer to D = rowsum(dO * O), fp32, shape (N, heads), contiguous
    CuSeqlens,  # pointer to the sequence offsets, shape (B + 1,), int32/int64
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head,
    num_heads,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads
    start = tl.load(CuSeqlens + seq).to(tl.int64)  # int64 before any stride product
    seqlen = (tl.load(CuSeqlens + seq + 1).to(tl.int64) - start).to(tl.int32)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen
    qmask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + start * stride_q_tok + head * stride_q_head + offs_m[:, None] * stride_q_tok + offs_d[None, :],
                mask=qmask, other=0.0)  # fmt: skip
    k_base = K + start * stride_k_tok + head * stride_k_head
    v_base = V + start * stride_v_tok + head * stride_v_head
    # the forward's online softmax (see attention.py): -inf start is safe, the first block has a key
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        kvmask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_k_tok + offs_d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_v_tok + offs_d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # l_i >= 1 on valid rows; the guard only rules out NaN
    o = acc / l_safe[:, None]
    do = tl.load(DO + start * stride_do_tok + head * stride_do_head + offs_m[:, None] * stride_do_tok
                 + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(do * o, axis=1)
    lse = m_i + tl.log2(l_safe)
    rows = (start + offs_m) * num_heads + head
    tl.store(LSE + rows, lse, mask=mask_m)
    tl.store(Delta + rows, delta, mask=mask_m)


@_tu.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # pointers as in the preprocess kernel
    LSE,  # pointer to the row log-sum-exp, fp32, shape (N, heads)
    Delta,  # pointer to D = rowsum(dO * O), fp32, shape (N, heads)
    DK,  # pointer to the key gradient, shape (N, heads, HEAD_DIM), contiguous
    DV,  # pointer to the value gradient, shape (N, heads, HEAD_DIM), contiguous
    CuSeqlens,  # pointer to the sequence offsets, shape (B + 1,)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_d_tok, stride_d_head,
    num_heads,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale (dK = sm_scale dS^T Q)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens + seq + 1).to(tl.int64) - start).to(tl.int32)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_n = offs_n < seqlen
    kvmask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + start * stride_k_tok + head * stride_k_head + offs_n[:, None] * stride_k_tok + offs_d[None, :],
                mask=kvmask, other=0.0)  # fmt: skip
    v = tl.load(V + start * stride_v_tok + head * stride_v_head + offs_n[:, None] * stride_v_tok + offs_d[None, :],
                mask=kvmask, other=0.0)  # fmt: skip
    q_base = Q + start * stride_q_tok + head * stride_q_head
    do_base = DO + start * stride_do_tok + head * stride_do_head
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < seqlen
        qmask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_q_tok + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_do_tok + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + (start + rows) * num_heads + head, mask=mask_m, other=0.0)
        delta = tl.load(Delta + (start + rows) * num_heads + head, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        # P exactly 0 outside the sequence (rows or keys past its end): nothing masked contributes
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    out = start * stride_d_tok + head * stride_d_head + offs_n[:, None] * stride_d_tok + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kvmask)


@_tu.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # pointers as in the preprocess kernel
    LSE,  # pointer to the row log-sum-exp, fp32, shape (N, heads)
    Delta,  # pointer to D = rowsum(dO * O), fp32, shape (N, heads)
    DQ,  # pointer to the query gradient, shape (N, heads, HEAD_DIM), contiguous
    CuSeqlens,  # pointer to the sequence offsets, shape (B + 1,)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_d_tok, stride_d_head,
    num_heads,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale (dQ = sm_scale dS K)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens + seq + 1).to(tl.int64) - start).to(tl.int32)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen
    qmask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + start * stride_q_tok + head * stride_q_head + offs_m[:, None] * stride_q_tok + offs_d[None, :],
                mask=qmask, other=0.0)  # fmt: skip
    do = tl.load(DO + start * stride_do_tok + head * stride_do_head + offs_m[:, None] * stride_do_tok
                 + offs_d[None, :], mask=qmask, other=0.0)  # fmt: skip
    lse = tl.load(LSE + (start + offs_m) * num_heads + head, mask=mask_m, other=0.0)
    delta = tl.load(Delta + (start + offs_m) * num_heads + head, mask=mask_m, other=0.0)
    k_base = K + start * stride_k_tok + head * stride_k_head
    v_base = V + start * stride_v_tok + head * stride_v_head
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        kvmask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_k_tok + offs_d[None, :], mask=kvmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_v_tok + offs_d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    out = start * stride_d_tok + head * stride_d_head + offs_m[:, None] * stride_d_tok + offs_d[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=qmask)


def _config(d_pad: int, fp32: bool, dkdv: bool = False) -> dict:
    """Tiles, warps and stages per kernel, head_dim bucket and precision (fixed, not autotuned).

    Chosen from ptxas resource usage for sm_80 and sm_90a (:func:`aot_specs`; no spills): the
    dK/dV kernel holds four (BLOCK_N, D_PAD) tiles (K, V and the two fp32 accumulators), so it gets
    more warps; fp32 with IEEE dots runs on FMA units with whole tiles in registers, hence small
    tiles and one stage (two stages spill). Tiny tiles under the interpreter, so the tests' short
    sequences span several blocks.
    """
    if _tu.interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if fp32:
        if dkdv:
            bm, bn, w = (16, 32, 8) if d_pad <= 64 else (16, 32, 4)
            return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": 1}
        bm = 32 if d_pad <= 64 else 16
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if dkdv:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    if d_pad <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def varlen_attention_bwd_triton(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0):
    """Triton backward of :func:`varlen_attention` (no dropout): ``(dq, dk, dv)``, contiguous, q's dtype."""
    assert dropout_p == 0.0 and q.shape[-1] <= 128
    total, heads, head_dim = q.shape
    q, k, v, grad = (t if t.stride(-1) == 1 or head_dim == 1 else t.contiguous() for t in (q, k, v, grad))
    dq, dk, dv = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device) for _ in range(3))
    batch = cu_seqlens.numel() - 1
    max_seqlen = int(max_seqlen)
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return dq, dk, dv
    cu = cu_seqlens.contiguous()
    lse = torch.empty((total, heads), dtype=torch.float32, device=q.device)
    delta = torch.empty((total, heads), dtype=torch.float32, device=q.device)
    d_pad = max(32, _tu.next_power_of_2(head_dim))
    fp32 = q.dtype == torch.float32
    cfg, cfg_kv = _config(d_pad, fp32), _config(d_pad, fp32, dkdv=True)
    consts = {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32"}
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad.stride(0), grad.stride(1))  # fmt: skip
    qk_scale = float(scale) * _LOG2E
    seqs_per_launch = max(1, _MAX_GRID_Y // heads)
    m_blocks = triton.cdiv(max_seqlen, cfg["BLOCK_M"])
    n_blocks = triton.cdiv(max_seqlen, cfg_kv["BLOCK_N"])
    with _tu.device_guard(q.device):
        for first in range(0, batch, seqs_per_launch):
            bh = min(seqs_per_launch, batch - first) * heads
            c = cu[first:]  # absolute offsets: a chunk of sequences is a slice
            _attn_bwd_preprocess_kernel[(m_blocks, bh)](
                q, k, v, grad, lse, delta, c, *strides, heads, qk_scale, **consts, **cfg
            )
            _attn_bwd_dkdv_kernel[(n_blocks, bh)](
                q, k, v, grad, lse, delta, dk, dv, c, *strides, dk.stride(0), dk.stride(1), heads, qk_scale,
                float(scale), **consts, **cfg_kv,
            )  # fmt: skip
            _attn_bwd_dq_kernel[(m_blocks, bh)](
                q, k, v, grad, lse, delta, dq, c, *strides, dq.stride(0), dq.stride(1), heads, qk_scale,
                float(scale), **consts, **cfg,
            )  # fmt: skip
    return dq, dk, dv


_dispatch.register_cpp_fake("varlen_attention_bwd", varlen_attention_bwd_fake)

#: The ``backward=`` entry of the attention op: Triton on the GPU (also behind ``cpp`` on CUDA,
#: whose forward is the Triton kernel), C++ on CPU.
BACKWARD = {"triton": varlen_attention_bwd_triton, "cpp": {"cpu": _bwd_cpp, "cuda": varlen_attention_bwd_triton}}


def varlen_attention_backward(grad, q, k, v, cu_seqlens, max_seqlen, scale, *, backend: str) -> tuple:
    """Gradients ``(dq, dk, dv)`` of :func:`varlen_attention` (no dropout) by ``backend``'s kernel."""
    impl = BACKWARD[backend]
    if isinstance(impl, dict):
        impl = impl[q.device.type]
    return impl(grad.contiguous(), q, k, v, cu_seqlens, int(max_seqlen), float(scale))


def aot_specs() -> list[dict]:
    """Every specialization the backward launcher can choose, for an ahead-of-time compile check
    (same format as :func:`~bert_fast.kernels.attention.aot_specs`): the three kernels per head_dim
    bucket and precision class."""
    ptrs = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "LSE": "*fp32", "Delta": "*fp32"}
    strides = {n: "i32" for n in ("stride_q_tok", "stride_q_head", "stride_k_tok", "stride_k_head", "stride_v_tok",
                                  "stride_v_head", "stride_do_tok", "stride_do_head")}  # fmt: skip
    out_strides = {"stride_d_tok": "i32", "stride_d_head": "i32"}
    sigs = {
        _attn_bwd_preprocess_kernel: {**ptrs, "CuSeqlens": "*i32", **strides, "num_heads": "i32", "qk_scale": "fp32"},
        _attn_bwd_dkdv_kernel: {**ptrs, "DK": "*{dt}", "DV": "*{dt}", "CuSeqlens": "*i32", **strides, **out_strides,
                                "num_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32"},
        _attn_bwd_dq_kernel: {**ptrs, "DQ": "*{dt}", "CuSeqlens": "*i32", **strides, **out_strides,
                              "num_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32"},
    }  # fmt: skip
    specs = []
    for head_dim in (26, 32, 64, 80, 128):
        d_pad = max(32, _tu.next_power_of_2(head_dim))
        for fp32 in (False, True):
            for kernel, sig in sigs.items():
                cfg = dict(_config(d_pad, fp32, dkdv=kernel is _attn_bwd_dkdv_kernel))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                specs.append({
                    "label": f"{kernel.__name__} d={head_dim} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w={warps}",
                    "kernel": kernel, "signature": sig,
                    "constexprs": {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32",
                                   **cfg},
                    "num_warps": warps, "num_stages": stages, "dtypes": ("fp32",) if fp32 else ("fp16", "bf16"),
                })  # fmt: skip
    return specs
