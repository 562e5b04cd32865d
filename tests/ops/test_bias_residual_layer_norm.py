"""``bias_residual_layer_norm`` on every backend against ``bias_residual_layer_norm_ref``.

CPU tier: odd and BERT hidden sizes, every combination of the optional inputs, strided rows,
fp32 parameters with half activations, constant rows at eps=1e-12, fp16 rows of |x| ~ 1e4 (fp32
statistics), determinism, gradients (reference backward), opcheck, the C++ errors. gpu tier:
BERT-base/large shapes in fp32/fp16/bf16 (``gpu_quick``: BERT-base, one variant per dtype).
Property-based fuzzing at the end (``test_fuzz``). Outputs are NaN-poisoned throughout.
"""

from __future__ import annotations

import _check
import bert_fast.kernels as K
import pytest
import torch
from _check import (
    BERT_SHAPES,
    DEVICE,
    DTYPES,
    HALF,
    ROW_HIDDENS,
    backend_skip_reason,
    bert_lengths,
    check_op,
    fp32_bound_for_layer_norm,
    fuzz_settings,
    load_cpp_ops,
    usable_dtypes,
)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import FP32_OP_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

OP = "bias_residual_layer_norm"
EPS = 1e-12

pytestmark = pytest.mark.usefixtures("poison")


def _run(backend, x, w, b, eps, lb=None, res=None):
    return K.bias_residual_layer_norm(x, w, b, eps, linear_bias=lb, residual=res, backend=backend)


def _ref(x, w, b, eps, lb=None, res=None):
    return K.bias_residual_layer_norm_ref(x, w, b, eps, lb, res)


def _inputs(shape, dtype, device, with_lb, with_res, scale=2.0, shift=0.5):
    hidden = shape[-1]
    x = (torch.randn(shape, device=device) * scale + shift).to(dtype)
    w = torch.randn(hidden, device=device).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype)
    lb = torch.randn(hidden, device=device).to(dtype) if with_lb else None
    res = torch.randn(shape, device=device).to(dtype) if with_res else None
    return x, w, b, lb, res


# --- CPU tier -----------------------------------------------------------------------------------


@pytest.mark.backends("cpp", "triton")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", ROW_HIDDENS)
@pytest.mark.parametrize(
    "with_lb,with_res,eps", [(False, False, 1e-5), (True, False, 1e-12), (False, True, 1e-5), (True, True, 1e-12)]
)
def test_matches_reference(backend, device, dtype, hidden, with_lb, with_res, eps):
    # leading dims are flattened; the C++ kernel splits 33 rows over threads, the interpreter (one
    # program per row) gets 9
    rows = (3, 11) if backend == "cpp" else (3, 3)
    x, w, b, lb, res = _inputs((*rows, hidden), dtype, device, with_lb, with_res)
    ours = _run(backend, x, w, b, eps, lb, res)
    assert ours.is_contiguous()
    check_op(ours, _ref, (x, w, b, eps, lb, res), atol=FP32_OP_ATOL, what=f"{backend} {dtype} H={hidden}")


def test_strided_rows_and_3d(backend, device):
    base = torch.randn(2, 7, 2 * 312, device=device)
    x = base[..., :312]  # row stride 624, last dim contiguous
    res = torch.randn(2, 7, 312, device=device)
    w, b = torch.randn(312, device=device), torch.randn(312, device=device)
    ours = _run(backend, x, w, b, 1e-5, None, res)
    assert_close_fp32(ours, _ref(x, w, b, 1e-5, None, res), FP32_OP_ATOL, f"{backend} strided")


@pytest.mark.parametrize("dtype", HALF)
def test_fp32_params_with_half_input(backend, device, dtype):
    x = torch.randn(7, 384, device=device, dtype=dtype)
    w, b = torch.randn(384, device=device), torch.randn(384, device=device)
    ours = _run(backend, x, w, b, EPS)
    assert ours.dtype == dtype
    ref32 = _ref(x.float(), w, b, EPS)
    torch_same = _ref(x, w.to(dtype), b.to(dtype), EPS)
    assert_half_rule(ours, torch_same, ref32, HALF_OP_FACTOR, f"{backend} fp32 params, {dtype} x")


def test_constant_rows_tiny_eps(backend, device):
    """Zero variance with eps=1e-12: rstd ~1e6, so the mean must be exact (output = bias)."""
    x = torch.randn(5, 312, device=device)
    x[1] = 3.7
    x[2] = -1e-3
    x[3] = 0.1
    w, b = torch.randn(312, device=device), torch.randn(312, device=device)
    ours = _run(backend, x, w, b, 1e-12)
    assert_close_fp32(ours, _ref(x, w, b, 1e-12), FP32_OP_ATOL, f"{backend} constant rows")
    for row in (1, 2, 3):
        assert torch.equal(ours[row], b), f"{backend}: constant row {row} is not exactly the bias"


@pytest.mark.parametrize("dtype", [torch.float16])
def test_fp16_large_activations(backend, device, dtype):
    """|x| ~ 1e4 in fp16: sum of squares ~1e8 * H overflows fp16, so statistics must be fp32."""
    x = (torch.randn(9, 768, device=device) * 1e4).to(dtype)
    res = (torch.randn(9, 768, device=device) * 1e4).to(dtype)
    w, b = torch.randn(768, device=device).to(dtype), torch.randn(768, device=device).to(dtype)
    ours = _run(backend, x, w, b, EPS, None, res)
    assert torch.isfinite(ours).all(), f"{backend}: fp16 LayerNorm of |x| ~ 1e4 overflowed"
    check_op(ours, _ref, (x, w, b, EPS, None, res), atol=FP32_OP_ATOL, what=f"{backend} fp16 |x|~1e4")


@pytest.mark.backends("torch", "cpp")  # determinism on CPU (the fuzz tests check every backend)
def test_identical_calls_are_bitwise_equal(backend, device):
    x, w, b, lb, res = _inputs((37, 384), torch.float32, device, True, True)
    first = _run(backend, x, w, b, EPS, lb, res)
    assert torch.equal(first, _run(backend, x, w, b, EPS, lb, res)), f"{backend}: two identical calls differ"


@pytest.mark.backends("cpp", "triton")
def test_gradients_equal_reference(backend, device):
    """Fused forward, the reference's backward: gradients equal the torch backend's."""
    h = 37
    shapes = ((5, h), (h,), (h,), (h,), (5, h))
    base = [torch.randn(s, device=device) for s in shapes]

    def run(be, x, w, b, lb, res):
        return _run(be, x, w, b, EPS, lb, res)

    _check.assert_grads_match_torch(run, base, backend, FP32_OP_ATOL)


def test_triton_unsupported_raises_auto_falls_back():
    reason = backend_skip_reason("triton")
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(2, 5000, device=DEVICE)  # hidden > 4096
    w, b = torch.ones(5000, device=DEVICE), torch.zeros(5000, device=DEVICE)
    with pytest.raises(K.BackendUnavailableError, match="hidden size 5000"):
        _run("triton", x, w, b, 1e-12)
    assert_close_fp32(K.bias_residual_layer_norm(x, w, b, 1e-12), _ref(x, w, b, 1e-12), FP32_OP_ATOL, "fallback")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(lambda x, w, b: (x, w, b, 1e-12, torch.randn(37), torch.randn(5, 37)), id="fp32-all-inputs"),
        pytest.param(lambda x, w, b: (x.bfloat16(), w, b, 1e-5, None, None), id="bf16-x-fp32-params"),
    ],
)
def test_opcheck(args):
    load_cpp_ops()
    x, w, b = torch.randn(5, 37), torch.randn(37), torch.randn(37)
    torch.library.opcheck(torch.ops.bert_fast.bias_residual_layer_norm.default, args(x, w, b))


def test_cpp_errors():
    reason = backend_skip_reason("cpp")
    if reason is not None:
        pytest.skip(reason)
    op = torch.ops.bert_fast.bias_residual_layer_norm
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(RuntimeError, match=r"layer_norm: x must be float32, bfloat16 or float16, got Long"):
        op(x.long(), w, b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\), got \[7\]"):
        op(x, w[:7], b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"x must be contiguous in its last dimension .* got stride 4"):
        op(torch.randn(8, 4).t(), w, b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"residual dtype BFloat16 != x dtype Float"):
        op(x, w, b, 1e-5, None, x.bfloat16())


# --- gpu tier: BERT shapes ----------------------------------------------------------------------


@pytest.mark.backends("triton", "cpp")
@pytest.mark.parametrize("dtype,model,variant", _check.bert_cases(("bias+residual", "plain")))
def test_bert_shapes(backend, device, dtype, model, variant):
    hidden, _ = BERT_SHAPES[model]
    n = sum(bert_lengths(32, 512))
    x, w, b, lb, res = _inputs((n, hidden), dtype, device, variant != "plain", variant != "plain", 1.0, 0.0)
    ours = _run(backend, x, w, b, EPS, lb, res)
    check_op(ours, _ref, (x, w, b, EPS, lb, res), atol=FP32_OP_ATOL, what=f"{backend} {model} {dtype}",
             oracle=torch.float64)


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random sizes (1, odd primes, BERT-ish), dtypes, optional inputs, offset views, scales."""

    @fuzz_settings(backend, device)
    @given(
        rows=st.sampled_from([1, 2, 5, 7, 11]),
        hidden=st.sampled_from([1, 2, 3, 7, 13, 31, 37, 127, 312]),
        dtype=st.sampled_from(usable_dtypes(backend, device)),
        with_lb=st.booleans(),
        with_res=st.booleans(),
        sliced=st.booleans(),
        eps=st.sampled_from([1e-12, 1e-5]),
        scale=st.sampled_from([0.01, 1.0, 30.0]),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(rows, hidden, dtype, with_lb, with_res, sliced, eps, scale, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        if sliced:  # an offset view whose row stride is wider than the row
            x = (torch.randn(rows, hidden + 9, device=device) * scale).to(dtype)[:, 5 : 5 + hidden]
            assert x.storage_offset() == 5
        else:
            x = (torch.randn(rows, hidden, device=device) * scale).to(dtype)
        _, w, b, lb, res = _inputs((rows, hidden), dtype, device, with_lb, with_res)
        ours = _run(backend, x, w, b, eps, lb, res)
        what = f"{backend} {dtype} rows={rows} H={hidden} sliced={sliced} scale={scale}"
        h = x.double() + (0 if lb is None else lb.double()) + (0 if res is None else res.double())
        check_op(ours, _ref, (x, w, b, eps, lb, res), atol=fp32_bound_for_layer_norm(h, FP32_OP_ATOL), what=what)
        assert torch.equal(ours, _run(backend, x, w, b, eps, lb, res)), f"{what}: two identical calls differ"

    case()
