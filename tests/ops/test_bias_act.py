"""``bias_act`` on every backend against ``bias_act_ref``.

CPU tier: every activation, odd and BERT widths, with and without bias, partial tiles, the
saturated tails of both GELUs, strided rows, extreme values and NaN propagation, determinism,
gradients (reference backward), opcheck, the C++ errors. gpu tier: BERT-base/large intermediate
widths in fp32/fp16/bf16 (``gpu_quick``: BERT-base, gelu). Fuzzing at the end. Outputs are
NaN-poisoned throughout.
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
    backend_skip_reason,
    bert_lengths,
    check_op,
    fuzz_settings,
    load_cpp_ops,
    usable_dtypes,
)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import FP32_OP_ATOL, assert_close_fp32

OP = "bias_act"
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")

pytestmark = pytest.mark.usefixtures("poison")


def _run(backend, x, bias, activation):
    return K.bias_act(x, bias, activation, backend=backend)


def _ref(activation):
    return lambda x, bias: K.bias_act_ref(x, bias, activation)


def test_activations_are_the_documented_set():
    assert tuple(K.ACTIVATIONS) == ACTIVATIONS


# --- CPU tier -----------------------------------------------------------------------------------


@pytest.mark.backends("cpp", "triton")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cols", (37, 148, 312, 3072))
@pytest.mark.parametrize("with_bias", (True, False))
def test_matches_reference(backend, device, dtype, activation, cols, with_bias):
    if cols == 3072 and backend == "triton" and device == "cpu":
        pytest.skip("3072-wide rows take seconds each under the Triton interpreter; the gpu tier runs them")
    # 33 (cpp) or 21 rows in a 3-D tensor (7 at BERT's 3072): partial row tiles; 148 = 37 * 4 columns: a partly masked
    # column tile. Values up to ~|30| reach the saturated tails of both GELUs.
    rows = (3, 11 if backend == "cpp" else 7) if cols < 3072 else (1, 7)
    x = (torch.randn(*rows, cols, device=device) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([30.0, -30.0, 0.0, -12.0])
    bias = torch.randn(cols, device=device).to(dtype) if with_bias else None
    ours = _run(backend, x, bias, activation)
    assert ours.shape == x.shape and ours.is_contiguous()
    check_op(ours, _ref(activation), (x, bias), atol=FP32_OP_ATOL, what=f"{backend} {activation} {dtype} I={cols}")


def test_strided_rows(backend, device):
    """A column slice (row stride != width, offset storage) is read through its stride."""
    base = torch.randn(19, 400, device=device)
    x = base[:, 10:322]
    bias = torch.randn(312, device=device)
    assert_close_fp32(_run(backend, x, bias, "gelu"), K.bias_act_ref(x, bias, "gelu"), FP32_OP_ATOL, "strided")


def test_extreme_values_and_nan(backend, device):
    # finite extremes only: at +inf PyTorch's own CPU GELU returns NaN (inf * 0 inside), ours inf
    x = torch.tensor([[-1e4, -100.0, -20.0, -5.0, -1e-6, 0.0, 1e-6, 5.0, 20.0, 100.0, 1e4]], device=device)
    for act in ACTIVATIONS:
        assert_close_fp32(_run(backend, x, None, act), K.bias_act_ref(x, None, act), FP32_OP_ATOL, act)
    nan = torch.tensor([[float("nan"), 1.0]], device=device)
    for act in ACTIVATIONS:
        assert torch.isnan(_run(backend, nan, None, act)[0, 0]), f"{backend} {act}: NaN must propagate"


@pytest.mark.backends("torch", "cpp")  # determinism on CPU (the fuzz tests check every backend)
def test_identical_calls_are_bitwise_equal(backend, device):
    x, bias = torch.randn(37, 312, device=device) * 3, torch.randn(312, device=device)
    first = _run(backend, x, bias, "gelu")
    assert torch.equal(first, _run(backend, x, bias, "gelu")), f"{backend}: two identical calls differ"


@pytest.mark.backends("cpp", "triton")
@pytest.mark.parametrize("activation", ("gelu", "gelu_tanh"))
def test_gradients_equal_reference(backend, device, activation):
    x0, b0 = torch.randn(5, 148, device=device), torch.randn(148, device=device)
    # the bias gradient is a column sum: its order of summation differs from autograd's
    _check.assert_grads_match_torch(
        lambda be, x, b: _run(be, x, b, activation), (x0, b0), backend, FP32_OP_ATOL, grad_atol=FP32_OP_ATOL
    )


def test_triton_rejects_float64():
    reason = backend_skip_reason("triton")
    if reason is not None:
        pytest.skip(reason)
    x64 = torch.randn(3, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(K.BackendUnavailableError, match="float64"):
        _run("triton", x64, None, "relu")


def test_unknown_activation_is_a_clear_error(backend, device):
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        _run(backend, torch.randn(2, 4, device=device), None, "swish")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x, b: (x, b, "gelu"), id="fp32-gelu-bias"),
        pytest.param(lambda x, b: (x.bfloat16(), None, "gelu_tanh"), id="bf16-gelu_tanh"),
    ],
)
def test_opcheck(make):
    load_cpp_ops()
    torch.library.opcheck(torch.ops.bert_fast.bias_act.default, make(torch.randn(5, 37), torch.randn(37)))


def test_cpp_errors():
    reason = backend_skip_reason("cpp")
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match=r"unknown activation 'swish'"):
        torch.ops.bert_fast.bias_act(torch.randn(4, 8), None, "swish")


# --- gpu tier: BERT shapes ----------------------------------------------------------------------


@pytest.mark.backends("triton", "cpp")
@pytest.mark.parametrize("dtype,model,activation", _check.bert_cases(ACTIVATIONS))
def test_bert_shapes(backend, device, dtype, model, activation):
    inter = 4 * BERT_SHAPES[model][0]
    x = (torch.randn(sum(bert_lengths(32, 128)), inter, device=device) * 3).to(dtype)
    bias = torch.randn(inter, device=device).to(dtype)
    ours = _run(backend, x, bias, activation)
    check_op(ours, _ref(activation), (x, bias), atol=FP32_OP_ATOL, what=f"{backend} {activation} {model} {dtype}",
             oracle=torch.float64)


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random sizes (1, odd primes), dtypes, activations, offset/strided views, leading dims."""

    @fuzz_settings(backend, device)
    @given(
        lead=st.sampled_from([(1,), (2,), (7,), (3, 5), (2, 1, 3)]),
        cols=st.sampled_from([1, 2, 3, 7, 13, 37, 127, 131, 1031]),
        dtype=st.sampled_from(usable_dtypes(backend, device)),
        activation=st.sampled_from(ACTIVATIONS),
        with_bias=st.booleans(),
        sliced=st.booleans(),
        scale=st.sampled_from([0.1, 3.0, 50.0]),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(lead, cols, dtype, activation, with_bias, sliced, scale, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        if sliced:
            x = (torch.randn(*lead, cols + 6, device=device) * scale).to(dtype)[..., 3 : 3 + cols]
        else:
            x = (torch.randn(*lead, cols, device=device) * scale).to(dtype)
        bias = torch.randn(cols, device=device).to(dtype) if with_bias else None
        ours = _run(backend, x, bias, activation)
        what = f"{backend} {activation} {dtype} shape={tuple(x.shape)} sliced={sliced}"
        check_op(ours, _ref(activation), (x, bias), atol=FP32_OP_ATOL * max(1.0, scale / 3.0), what=what)
        assert torch.equal(ours, _run(backend, x, bias, activation)), f"{what}: two identical calls differ"

    case()
