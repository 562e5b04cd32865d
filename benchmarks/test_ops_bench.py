"""Micro-benchmarks of the fused ops against their PyTorch references, at BERT-base shapes.

Shapes: the ``mixed`` batch packed (``bert_fast.bench.MIXED_LENGTHS``: batch 8, 524 real tokens of
1024), hidden 768, intermediate 3072, 12 heads of 64. For every op and dtype (fp32,
bf16): ``ref`` (the ``<op>_ref`` function called directly) and each backend (``triton``, ``cpp``,
``torch``) that can run on the device; the others are skipped with the reason.

Each benchmark records in ``extra_info`` the fewest bytes the op must move and the bandwidth that
implies at the median time (``--benchmark-json FILE`` keeps them), so a result reads against the
machine's copy ceiling (benchmarks/ceilings.py, benchmarks/NOTES.md).

Run: ``pytest benchmarks/`` (options in benchmarks/pytest.ini). ``make test`` runs them once with
``--benchmark-disable`` as smoke tests (each op called, nothing timed, no stats).
"""

from __future__ import annotations

import math

import pytest
import torch
from bert_fast.kernels import _backend

from bert_fast import kernels as K
from bert_fast.bench.workloads import MIXED_LENGTHS as LENGTHS

BATCH, SEQ = len(LENGTHS), max(LENGTHS)
TOKENS = sum(LENGTHS)  # 524
HIDDEN, INTER, HEADS = 768, 3072, 12
HEAD_DIM = HIDDEN // HEADS
VOCAB, MAX_POS = 30522, 512
EPS = 1e-12

IMPLS = ("ref", "triton", "cpp", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Ops with no Triton kernel by design (kernels/padding.py): the triton backend runs torch there.
NO_TRITON = {"unpad_mask", "gather_rows", "scatter_rows"}


def _skip_reason(impl: str, op: str, device: torch.device) -> str | None:
    if impl == "ref" or impl == "torch":
        return None
    if impl == "triton":
        if op in NO_TRITON:
            return f"{op} has no Triton kernel (PyTorch's indexing kernels serve the triton backend)"
        if device.type != "cuda":
            return "Triton on CPU runs only under the interpreter: far too slow to benchmark"
        if not _backend.triton_importable():
            return "triton is not installed"
        return None
    if impl == "cpp":
        if _backend.load_cpp_extension() is None:
            return "the C++ extension bert_fast._C is not built"
        if not _backend.cpp_usable(device):
            return f"bert_fast._C has no {device.type} kernels"
    return None


def _mask(device) -> torch.Tensor:
    return torch.arange(SEQ, device=device)[None, :] < torch.tensor(LENGTHS, device=device)[:, None]


def _cu_seqlens(device) -> torch.Tensor:
    lens = torch.tensor((0, *LENGTHS), dtype=torch.int32, device=device)
    return torch.cumsum(lens, 0, dtype=torch.int32)


def _case(op: str, dtype: torch.dtype, device: torch.device):
    """(ref callable, fused callable taking backend=, fewest bytes moved)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    es = torch.empty((), dtype=dtype).element_size()
    if op == "bias_residual_layer_norm":
        x, res = rnd(TOKENS, HIDDEN), rnd(TOKENS, HIDDEN)
        w, b, lb = rnd(HIDDEN), rnd(HIDDEN), rnd(HIDDEN)
        ref = lambda: K.bias_residual_layer_norm_ref(x, w, b, EPS, lb, res)  # noqa: E731
        fused = lambda be: K.bias_residual_layer_norm(x, w, b, EPS, linear_bias=lb, residual=res, backend=be)  # noqa: E731
        return ref, fused, es * (3 * TOKENS * HIDDEN + 3 * HIDDEN)
    if op == "bias_act":
        x, b = rnd(TOKENS, INTER), rnd(INTER)
        return (
            lambda: K.bias_act_ref(x, b, "gelu"),
            lambda be: K.bias_act(x, b, "gelu", backend=be),
            es * (2 * TOKENS * INTER + INTER),
        )
    if op == "embed_layer_norm":
        ids = torch.randint(0, VOCAB, (TOKENS,), generator=g).to(device)
        pos = torch.cat([torch.arange(n) for n in LENGTHS]).to(device)
        tt = torch.zeros(TOKENS, dtype=torch.long, device=device)
        we, pe, te = rnd(VOCAB, HIDDEN, scale=0.02), rnd(MAX_POS, HIDDEN, scale=0.02), rnd(2, HIDDEN, scale=0.02)
        w, b = rnd(HIDDEN), rnd(HIDDEN)
        args = (ids, pos, tt, we, pe, te, w, b, EPS)
        return (
            lambda: K.embed_layer_norm_ref(*args),
            lambda be: K.embed_layer_norm(*args, backend=be),
            es * (3 * TOKENS * HIDDEN + TOKENS * HIDDEN) + 3 * 8 * TOKENS,
        )
    if op == "varlen_attention":
        qkv = rnd(TOKENS, 3, HEADS, HEAD_DIM)
        q, k, v = qkv.unbind(1)  # strided views into the fused QKV output, as the model passes them
        cu = _cu_seqlens(device)
        return (
            lambda: K.varlen_attention_ref(q, k, v, cu, SEQ),
            lambda be: K.varlen_attention(q, k, v, cu, SEQ, backend=be),
            es * 4 * TOKENS * HIDDEN,
        )
    if op == "unpad_mask":
        mask = _mask(device)
        return lambda: K.unpad_mask_ref(mask), lambda be: K.unpad_mask(mask, backend=be), BATCH * SEQ + 8 * TOKENS
    if op == "gather_rows":
        x = rnd(BATCH * SEQ, HIDDEN)
        idx = torch.nonzero(_mask(device).flatten()).flatten()
        return (
            lambda: K.gather_rows_ref(x, idx),
            lambda be: K.gather_rows(x, idx, backend=be),
            es * 2 * TOKENS * HIDDEN + 8 * TOKENS,
        )
    if op == "scatter_rows":
        x = rnd(TOKENS, HIDDEN)
        idx = torch.nonzero(_mask(device).flatten()).flatten()
        return (
            lambda: K.scatter_rows_ref(x, idx, BATCH * SEQ),
            lambda be: K.scatter_rows(x, idx, BATCH * SEQ, backend=be),
            es * (TOKENS * HIDDEN + BATCH * SEQ * HIDDEN) + 8 * TOKENS,
        )
    raise ValueError(op)


OPS = tuple(op for op in _backend.CPP_OPS if op != "linear")  # the GEMM has its own benchmarks
CASES = [(op, d) for op in OPS for d in (("mask",) if op == "unpad_mask" else tuple(DTYPES))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op,dtype_name", CASES, ids=[f"{op}-{d}" for op, d in CASES])
def test_op(benchmark, device, op, dtype_name, impl):
    reason = _skip_reason(impl, op, device)
    if reason:
        pytest.skip(reason)
    dtype = DTYPES.get(dtype_name, torch.float32)
    ref, fused, nbytes = _case(op, dtype, device)
    fn = ref if impl == "ref" else (lambda: fused(impl))
    if device.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    with torch.inference_mode():
        fn()  # first call: extension load, kernel compilation, oneDNN primitive creation
        benchmark.group = f"{op} {dtype_name} ({TOKENS} tokens)"
        benchmark.extra_info.update(op=op, dtype=dtype_name, impl=impl, tokens=TOKENS, fewest_bytes=nbytes)
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable (one untimed call)
    median = stats.stats.median if stats is not None else None
    if median is not None and median > 0 and math.isfinite(median):
        benchmark.extra_info["GB_per_s_at_median"] = nbytes / median / 1e9
