"""``linear`` (``x @ weight.T + bias``) on the ``torch`` and ``cpp`` backends against fp32 ``F.linear``.

The GEMM itself is oneDNN's / cuBLAS's; what the ``cpp`` backend adds on the CPU is the row split
of half-precision GEMMs over threads and prepacked oneDNN weights for small batches. CPU tier: row
counts around the split thresholds with 1-3 threads, with and without bias, grad and inference
mode, 3-D input, prepacked weights, opcheck, the C++ errors. gpu tier: BERT-base GEMM shapes.
Fuzzing at the end. There is no Triton GEMM of ours (``linear`` is cuBLAS's on the GPU).
"""

from __future__ import annotations

import importlib

import bert_fast.kernels as K
import pytest
import torch
from _check import DTYPES, HALF, fuzz_settings, load_cpp_ops, skip_unless_cpp
from hypothesis import given
from hypothesis import strategies as st
from tolerances import HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

OP = "linear"
OP_BACKENDS = ("torch", "cpp")

#: fp32 GEMMs accumulate K products in a different order than the reference: a wider bound than
#: the elementwise ops' (K = 96 here).
FP32_GEMM_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("poison")


def _check(ours, xs, ws, bs, x, w, b, what):
    ref32 = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert ours.shape == ref32.shape and ours.dtype == xs.dtype, what
    if xs.dtype == torch.float32:
        assert_close_fp32(ours, ref32, FP32_GEMM_ATOL, what)
    else:
        assert_half_rule(ours, torch.nn.functional.linear(xs, ws, bs), ref32, HALF_OP_FACTOR, what)


@pytest.mark.backends("cpp")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 37, 300, 524, 1031])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(backend, device, dtype, rows, with_bias):
    """cpp: rows split across threads (half precision, >= 128 rows per thread) or at::linear; same math."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 96, device=device), torch.randn(80, 96, device=device) * 0.1
    b = torch.randn(80, device=device) if with_bias else None
    xs, ws, bs = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
    for threads in (1, 2, 3) if backend == "cpp" else (torch.get_num_threads(),):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ours = K.linear(xs, ws, bs, backend=backend)
            with torch.inference_mode():
                ours_inf = K.linear(xs, ws, bs, backend=backend)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(ours, ours_inf), f"{backend}: inference mode changed the result"
        _check(ours, xs, ws, bs, x, w, b, f"{backend} linear {dtype} rows={rows} threads={threads}")


def test_3d_input(backend, device):
    x, w = torch.randn(2, 300, 64, device=device).bfloat16(), torch.randn(32, 64, device=device).bfloat16()
    out = K.linear(x, w, backend=backend)
    assert out.shape == (2, 300, 32)
    _check(out, x, w, None, x, w, None, f"{backend} 3-D")


def _onednn_runs(dtype: torch.dtype) -> bool:
    """Can oneDNN reorder (prepack) weights of ``dtype`` on this CPU? (half precision needs AVX-512
    BW/VL/DQ or AVX-NE-CONVERT)"""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 256, 257])
def test_prepacked_small_batches(dtype, rows):
    """cpp: prepacked oneDNN weights up to PACKED_MAX_ROWS rows where oneDNN runs the dtype on this
    CPU (the packing callback is called then only); elsewhere the unpacked GEMM, same results."""
    skip_unless_cpp()
    mod = importlib.import_module("bert_fast.kernels.linear")
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 64), torch.randn(48, 64) * 0.1, torch.randn(48)
    xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
    calls = []

    def pack():
        calls.append(1)
        return K.prepack_weight(ws)

    with torch.inference_mode():
        ours = K.linear(xs, ws, bs, backend="cpp", packed=pack)
    assert bool(calls) == (rows <= mod.PACKED_MAX_ROWS and _onednn_runs(dtype)), f"packing called {len(calls)} times"
    _check(ours, xs, ws, bs, x, w, b, f"prepacked {dtype} rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepack_probe_forced_off(monkeypatch, caplog, dtype):
    """A CPU where oneDNN cannot reorder the weights (forced through the probe's ISA check, as on an
    AVX2-only CPU for bf16): the probe says so once at DEBUG, the packing callback is never called and
    the unpacked op gives the same math."""
    skip_unless_cpp()
    mod = importlib.import_module("bert_fast.kernels.linear")
    monkeypatch.setattr(mod, "_onednn_half_isa", lambda dt: False)
    mod._mkldnn_linear_available.cache_clear()
    try:
        torch.manual_seed(3)
        x, w, b = torch.randn(16, 64), torch.randn(48, 64) * 0.1, torch.randn(48)
        xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
        calls = []

        def pack():
            calls.append(1)
            return K.prepack_weight(ws)

        with caplog.at_level("DEBUG", logger="bert_fast.kernels"), torch.inference_mode():
            ours = K.linear(xs, ws, bs, backend="cpp", packed=pack)
            again = K.linear(xs, ws, bs, backend="cpp", packed=pack)
        assert not calls, "the packed path was taken although the probe refused it"
        probes = [r.getMessage() for r in caplog.records if "small batches use" in r.getMessage()]
        assert len(probes) == 1 and "torch.ops.bert_fast.linear" in probes[0], probes
        assert torch.equal(ours, again)
        _check(ours, xs, ws, bs, x, w, b, f"forced unpacked {dtype}")
    finally:
        mod._mkldnn_linear_available.cache_clear()


def test_prepack_probe_matches_onednn():
    """The probe's answer per dtype is what a real prepack on this CPU does (raise or not)."""
    skip_unless_cpp()
    mod = importlib.import_module("bert_fast.kernels.linear")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            K.prepack_weight(torch.ones(8, 16, dtype=dtype))
            packs = True
        except RuntimeError:
            packs = False
        if not packs:
            assert not mod._mkldnn_linear_available(dtype), f"probe says {dtype} packs, the prepack raises"
        elif dtype == torch.float32:
            assert mod._mkldnn_linear_available(dtype), "probe refused fp32 although the prepack works"


@pytest.mark.parametrize("case", ("fp32-bias", "bf16-no-bias"))
def test_opcheck(case):
    load_cpp_ops()
    if case == "fp32-bias":
        args = (torch.randn(5, 37), torch.randn(7, 37), torch.randn(7))
    else:
        args = (torch.randn(300, 37).bfloat16(), torch.randn(7, 37).bfloat16(), None)
    torch.library.opcheck(torch.ops.bert_fast.linear.default, args)


def test_cpp_errors():
    skip_unless_cpp()
    op = torch.ops.bert_fast.linear
    with pytest.raises(RuntimeError, match="x has 63 features in its last dim, weight expects 64"):
        op(torch.randn(4, 63), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x is BFloat16, weight is Float"):
        op(torch.randn(4, 64).bfloat16(), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8\)"):
        op(torch.randn(4, 64), torch.randn(8, 64), torch.randn(9))


# --- gpu tier: BERT-base GEMM shapes ------------------------------------------------------------


@pytest.mark.backends("cpp")
@pytest.mark.parametrize(
    "dtype", [pytest.param(d, marks=[pytest.mark.gpu, pytest.mark.gpu_quick], id=str(d)[6:]) for d in HALF]
)
@pytest.mark.parametrize("out_features,in_features", [(2304, 768), (3072, 768), (768, 3072)])
def test_bert_shapes(backend, device, dtype, out_features, in_features):
    x = torch.randn(4096, in_features, device=device)
    w, b = torch.randn(out_features, in_features, device=device) * 0.05, torch.randn(out_features, device=device)
    xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
    try:
        ours = K.linear(xs, ws, bs, backend=backend)
    except K.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    _check(ours, xs, ws, bs, x, w, b, f"{backend} {dtype} {out_features}x{in_features}")


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random GEMM sizes (1, odd primes), dtypes, bias, leading dims, transposed/offset weights."""

    @fuzz_settings(backend, device)
    @given(
        lead=st.sampled_from([(1,), (7,), (131,), (2, 3), (3, 1, 5)]),
        k=st.sampled_from([1, 3, 17, 64, 127]),
        n=st.sampled_from([1, 5, 31, 48]),
        dtype=st.sampled_from(DTYPES),
        with_bias=st.booleans(),
        weight_view=st.sampled_from(["contiguous", "transposed", "sliced"]),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(lead, k, n, dtype, with_bias, weight_view, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        x = torch.randn(*lead, k, device=device)
        if weight_view == "transposed":
            w = (torch.randn(k, n, device=device) * 0.1).t()
        elif weight_view == "sliced":
            w = (torch.randn(n + 2, k + 3, device=device) * 0.1)[1 : 1 + n, 2 : 2 + k]
        else:
            w = torch.randn(n, k, device=device) * 0.1
        b = torch.randn(n, device=device) if with_bias else None
        xs, ws, bs = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
        ours = K.linear(xs, ws, bs, backend=backend)
        what = f"{backend} {dtype} x={tuple(x.shape)} w={tuple(w.shape)} {weight_view}"
        _check(ours, xs, ws, bs, x, w, b, what)
        assert torch.equal(ours, K.linear(xs, ws, bs, backend=backend)), f"{what}: two identical calls differ"

    case()
