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
* Triton, FlashAttention-2's backward in three launches of two kernels, grids (blocks of
  ``max_seqlen``, batch * heads) as the forward, programs past their sequence's length exit at once:
  ``_attn_bwd_preprocess_kernel`` (per query block) recomputes the forward's online softmax to get
  O and the row's log-sum-exp (base 2), and stores LSE and ``D = rowsum(dO * O)`` (fp32);
  ``_attn_bwd_kernel`` with ``DKDV`` (per key block) keeps its K, V tiles and the dK, dV
  accumulators in registers and loops over the sequence's query blocks, recomputing
  ``P = exp2(S - LSE)``; without ``DKDV`` (per query block, its own tiles and warps) it loops over the
  key blocks for dQ. The two passes share one argument list and their helpers; ``DKDV`` is a
  constexpr, so each is compiled alone. No atomics: the result is deterministic. Limits as the
  forward: head_dim <= 128 (padded to a power of two >= 32 with masks), fp16/bf16/fp32, unit stride
  along head_dim.

Dropout (the forward's mask Z, multipliers 0 or 1 / (1 - p), regenerated from the seed by
:func:`~bert_fast.kernels._triton_utils.dropout_keep` in each kernel, constexpr ``DROPOUT``, never
stored): ``O = (P Z) V``, so the preprocess kernel's recomputed O (for ``D = rowsum(dO * O)``) drops
too while its LSE is the un-dropped softmax's; ``dV = (P Z)^T dO``; ``dP = (dO V^T) Z``;
``dS = P * (dP - D)`` (D = rowsum(P * dP) = rowsum(dO * O) still holds). The C++ kernel applies the
same formulas. The variants without dropout compile exactly as before.

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


def _bwd_cpp(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    op = torch.ops.bert_fast.varlen_attention_bwd
    return op(grad, q, k, v, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), seed or 0)


_bwd_cpp.available = lambda: hasattr(torch.ops.bert_fast, "varlen_attention_bwd")  # type: ignore[attr-defined]


def varlen_attention_bwd_fake(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=0):
    """Fake (meta) implementation of ``bert_fast::varlen_attention_bwd``."""
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


# --- Triton kernels ------------------------------------------------------------------------------


@_tu.jit(do_not_specialize=_tu.DROPOUT_ARGS)
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
    stream_offset,  # dropout stream of the launch's first (sequence, head); the forward's
    seed: tl.int64,  # the forward's dropout seed (read iff DROPOUT)
    dropout_threshold: tl.int64,
    dropout_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    start, seqlen, head = _tu.varlen_program(CuSeqlens, num_heads)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m, offs_n, offs_d, mask_d, mask_m = _tu.varlen_offsets(pid_m, seqlen, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N)
    q = _tu.load_tile(Q + start * stride_q_tok + head * stride_q_head, offs_m, stride_q_tok, offs_d, mask_m, mask_d)
    k_base = K + start * stride_k_tok + head * stride_k_head
    v_base = V + start * stride_v_tok + head * stride_v_head
    m_i, l_i, acc = _tu.online_softmax_init(BLOCK_M, D_PAD)  # the forward's online softmax (attention.py)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        k = _tu.load_tile(k_base, cols, stride_k_tok, offs_d, mask_n, mask_d)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p, alpha, m_i, l_i = _tu.online_softmax_step(s, mask_n, m_i, l_i)
        if DROPOUT:  # O is the forward's, dropped probabilities included (LSE is not: un-dropped P)
            stream = stream_offset + tl.program_id(1).to(tl.int64)
            p = tl.where(_tu.dropout_keep(seed, stream, offs_m[:, None] * seqlen + cols[None, :], dropout_threshold),
                         p, 0.0)  # fmt: skip
        v = _tu.load_tile(v_base, cols, stride_v_tok, offs_d, mask_n, mask_d)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # l_i >= 1 on valid rows; the guard only rules out NaN
    o = acc / l_safe[:, None]
    if DROPOUT:
        o = o * dropout_scale
    do_base = DO + start * stride_do_tok + head * stride_do_head
    do = _tu.load_tile(do_base, offs_m, stride_do_tok, offs_d, mask_m, mask_d).to(tl.float32)
    delta = tl.sum(do * o, axis=1)
    lse = m_i + tl.log2(l_safe)
    rows = (start + offs_m) * num_heads + head
    tl.store(LSE + rows, lse, mask=mask_m)
    tl.store(Delta + rows, delta, mask=mask_m)


@_tu.jit
def _row_stats(LSE, Delta, tok, head, num_heads, mask):
    """The preprocess kernel's LSE and D of the query rows ``tok`` (absolute token indices) of one head."""
    lse = tl.load(LSE + tok * num_heads + head, mask=mask, other=0.0)
    return lse, tl.load(Delta + tok * num_heads + head, mask=mask, other=0.0)


@_tu.jit
def _recompute_p(q, k, lse, mask_m, mask_n, qk_scale, DOT_PRECISION: tl.constexpr):
    """``P = exp2(S - LSE)`` of a (BLOCK_M query rows, BLOCK_N keys) tile, recomputed in fp32 from the
    rows' log-sum-exp."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    # P exactly 0 outside the sequence (rows or keys past its end): nothing masked contributes
    return tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)


@_tu.jit
def _grad_scores(p, do, v, delta, DOT_PRECISION: tl.constexpr):
    """``dS = P * (dO V^T - D)`` of the same tile (fp32)."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p * (dp - delta[:, None])


@_tu.jit
def _grad_scores_dropout(p, keep, do, v, delta, dropout_scale, DOT_PRECISION: tl.constexpr):
    """``dS = P * (dP - D)`` with dropout: ``dP = (dO V^T) * Z``, Z = the mask ``keep`` times 1 / (1 - p)."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p * (tl.where(keep, dp * dropout_scale, 0.0) - delta[:, None])


@_tu.jit
def _store_tile(Out, acc, start, head, offs, offs_d, stride_tok, stride_head, mask, mask_d):
    """Stores the fp32 (rows ``offs``, D_PAD) tile ``acc`` of one head in Out's dtype (one rounding)."""
    ptrs = Out + start * stride_tok + head * stride_head + offs[:, None] * stride_tok + offs_d[None, :]
    tl.store(ptrs, acc.to(Out.dtype.element_ty), mask=mask[:, None] & mask_d[None, :])


@_tu.jit(do_not_specialize=_tu.DROPOUT_ARGS)
def _attn_bwd_kernel(
    Q, K, V, DO,  # pointers as in the preprocess kernel
    LSE,  # pointer to the row log-sum-exp, fp32, shape (N, heads)
    Delta,  # pointer to D = rowsum(dO * O), fp32, shape (N, heads)
    DQ,  # pointer to the query gradient, shape (N, heads, HEAD_DIM), contiguous; written iff not DKDV
    DK,  # pointer to the key gradient, same layout as DQ; written iff DKDV
    DV,  # pointer to the value gradient, same layout as DQ; written iff DKDV
    CuSeqlens,  # pointer to the sequence offsets, shape (B + 1,)
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_d_tok, stride_d_head,
    num_heads,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale (dQ = sm_scale dS K, dK = sm_scale dS^T Q)
    stream_offset,  # dropout stream of the launch's first (sequence, head)
    seed: tl.int64,  # the forward's dropout seed (read iff DROPOUT)
    dropout_threshold: tl.int64,
    dropout_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DKDV: tl.constexpr,  # the dK/dV pass (per key block) if set, else the dQ pass (per query block)
    DROPOUT: tl.constexpr,  # regenerate the forward's mask Z: dV = (P Z)^T dO, dP = (dO V^T) Z
):  # fmt: skip
    pid = tl.program_id(0)
    start, seqlen, head = _tu.varlen_program(CuSeqlens, num_heads)
    if pid * (BLOCK_N if DKDV else BLOCK_M) >= seqlen:
        return
    q_base = Q + start * stride_q_tok + head * stride_q_head
    k_base = K + start * stride_k_tok + head * stride_k_head
    v_base = V + start * stride_v_tok + head * stride_v_head
    do_base = DO + start * stride_do_tok + head * stride_do_head
    if DKDV:
        # K, V tiles and the dK, dV accumulators stay in registers; loop over the query blocks
        offs_n, offs_m, offs_d, mask_d, mask_n = _tu.varlen_offsets(pid, seqlen, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_M)
        k = _tu.load_tile(k_base, offs_n, stride_k_tok, offs_d, mask_n, mask_d)
        v = _tu.load_tile(v_base, offs_n, stride_v_tok, offs_d, mask_n, mask_d)
        dk, dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32), tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for start_m in range(0, seqlen, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < seqlen
            q = _tu.load_tile(q_base, rows, stride_q_tok, offs_d, mask_m, mask_d)
            do = _tu.load_tile(do_base, rows, stride_do_tok, offs_d, mask_m, mask_d)
            lse, delta = _row_stats(LSE, Delta, start + rows, head, num_heads, mask_m)
            p = _recompute_p(q, k, lse, mask_m, mask_n, qk_scale, DOT_PRECISION)
            if DROPOUT:
                keep = _tu.dropout_keep(seed, stream_offset + tl.program_id(1).to(tl.int64),
                                        rows[:, None] * seqlen + offs_n[None, :], dropout_threshold)  # fmt: skip
                pz = tl.where(keep, p * dropout_scale, 0.0)
                dv += tl.dot(tl.trans(pz.to(do.dtype)), do, input_precision=DOT_PRECISION)
                ds = _grad_scores_dropout(p, keep, do, v, delta, dropout_scale, DOT_PRECISION)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                ds = _grad_scores(p, do, v, delta, DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dk = dk * sm_scale
        out = start * stride_d_tok + head * stride_d_head + offs_n[:, None] * stride_d_tok + offs_d[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    else:
        # Q, dO, LSE, D of the query block and the dQ accumulator stay in registers; loop over the keys
        offs_m, offs_n, offs_d, mask_d, mask_m = _tu.varlen_offsets(pid, seqlen, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N)
        q = _tu.load_tile(q_base, offs_m, stride_q_tok, offs_d, mask_m, mask_d)
        do = _tu.load_tile(do_base, offs_m, stride_do_tok, offs_d, mask_m, mask_d)
        lse, delta = _row_stats(LSE, Delta, start + offs_m, head, num_heads, mask_m)
        dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < seqlen
            k = _tu.load_tile(k_base, cols, stride_k_tok, offs_d, mask_n, mask_d)
            v = _tu.load_tile(v_base, cols, stride_v_tok, offs_d, mask_n, mask_d)
            p = _recompute_p(q, k, lse, mask_m, mask_n, qk_scale, DOT_PRECISION)
            if DROPOUT:
                keep = _tu.dropout_keep(seed, stream_offset + tl.program_id(1).to(tl.int64),
                                        offs_m[:, None] * seqlen + cols[None, :], dropout_threshold)  # fmt: skip
                ds = _grad_scores_dropout(p, keep, do, v, delta, dropout_scale, DOT_PRECISION)
            else:
                ds = _grad_scores(p, do, v, delta, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        _store_tile(DQ, dq * sm_scale, start, head, offs_m, offs_d, stride_d_tok, stride_d_head, mask_m, mask_d)


def _config(d_pad: int, fp32: bool, dkdv: bool = False, dropout: bool = False) -> dict:
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
        # with dropout at head_dim <= 32, 8 warps leave the preprocess kernel an 8-byte stack on sm_90
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4 if dropout and d_pad <= 32 else 8, "num_stages": 2}
    if dkdv:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    if d_pad <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def varlen_attention_bwd_triton(grad, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    """Triton backward of :func:`varlen_attention` (the forward's dropout mask regenerated from ``seed``):
    ``(dq, dk, dv)``, contiguous, q's dtype."""
    assert q.shape[-1] <= 128
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
    dropout = dropout_p > 0
    cfg, cfg_kv = _config(d_pad, fp32, dropout=dropout), _config(d_pad, fp32, dkdv=True, dropout=dropout)
    consts = {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32", "DROPOUT": dropout}
    drop = _tu.dropout_args(dropout_p, seed)
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
                q, k, v, grad, lse, delta, c, *strides, heads, qk_scale, first * heads, *drop, **consts, **cfg
            )
            for grid, dkdv, kcfg in (((n_blocks, bh), True, cfg_kv), ((m_blocks, bh), False, cfg)):
                _attn_bwd_kernel[grid](
                    q, k, v, grad, lse, delta, dq, dk, dv, c, *strides, dq.stride(0), dq.stride(1), heads, qk_scale,
                    float(scale), first * heads, *drop, **consts, DKDV=dkdv, **kcfg,
                )  # fmt: skip
    return dq, dk, dv


_dispatch.register_cpp_fake("varlen_attention_bwd", varlen_attention_bwd_fake)

#: The ``backward=`` entry of the attention op: Triton on the GPU (also behind ``cpp`` on CUDA,
#: whose forward is the Triton kernel), C++ on CPU.
BACKWARD = {"triton": varlen_attention_bwd_triton, "cpp": {"cpu": _bwd_cpp, "cuda": varlen_attention_bwd_triton}}


def varlen_attention_backward(
    grad, q, k, v, cu_seqlens, max_seqlen, scale, *, backend: str, dropout_p: float = 0.0, seed: int | None = None
) -> tuple:
    """Gradients ``(dq, dk, dv)`` of :func:`varlen_attention` by ``backend``'s kernel (dropout: the C++
    kernel only, the forward's ``seed``)."""
    impl = BACKWARD[backend]
    if isinstance(impl, dict):
        impl = impl[q.device.type]
    return impl(grad.contiguous(), q, k, v, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), seed)


def aot_specs() -> list[dict]:
    """Every specialization the backward launcher can choose, for an ahead-of-time compile check
    (same format as :func:`~bert_fast.kernels.attention.aot_specs`): the three kernels per head_dim
    bucket and precision class (the dK/dV and dQ passes of ``_attn_bwd_kernel`` compile separately)."""
    ptrs = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "LSE": "*fp32", "Delta": "*fp32"}
    strides = {n: "i32" for n in ("stride_q_tok", "stride_q_head", "stride_k_tok", "stride_k_head", "stride_v_tok",
                                  "stride_v_head", "stride_do_tok", "stride_do_head")}  # fmt: skip
    out_strides = {"stride_d_tok": "i32", "stride_d_head": "i32"}
    drop = {"stream_offset": "i32", "seed": "i64", "dropout_threshold": "i64", "dropout_scale": "fp32"}
    bwd_sig = {**ptrs, "DQ": "*{dt}", "DK": "*{dt}", "DV": "*{dt}", "CuSeqlens": "*i32", **strides, **out_strides,
               "num_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32", **drop}  # fmt: skip
    passes = [  # (kernel, signature, extra constexprs, label)
        (_attn_bwd_preprocess_kernel, {**ptrs, "CuSeqlens": "*i32", **strides, "num_heads": "i32", "qk_scale": "fp32",
                                       **drop}, {}, "_attn_bwd_preprocess_kernel"),
        (_attn_bwd_kernel, bwd_sig, {"DKDV": True}, "_attn_bwd_kernel[dkdv]"),
        (_attn_bwd_kernel, bwd_sig, {"DKDV": False}, "_attn_bwd_kernel[dq]"),
    ]  # fmt: skip
    specs = []
    for head_dim in (26, 32, 64, 80, 128):
        d_pad = max(32, _tu.next_power_of_2(head_dim))
        for fp32, kernel, sig, extra, name in ((f, *pass_) for f in (False, True) for pass_ in passes):
            for dropout in (False, True) if head_dim in (26, 32, 64, 128) else (False,):
                cfg = dict(_config(d_pad, fp32, dkdv=extra.get("DKDV", False), dropout=dropout))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                specs.append({
                    "label": f"{name} d={head_dim} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w={warps}"
                             + (" dropout" if dropout else ""),
                    "kernel": kernel, "signature": sig,
                    "constexprs": {"HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32",
                                   **cfg, **extra, "DROPOUT": dropout},
                    "num_warps": warps, "num_stages": stages, "dtypes": ("fp32",) if fp32 else ("fp16", "bf16"),
                })  # fmt: skip
    return specs
