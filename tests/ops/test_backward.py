"""Fused backward kernels (C++ on CPU, Triton under the interpreter) against the reference backward.

Every case runs the op through its public functional under autograd (so through the dispatch's
fused-backward wrapper), checks that the fused backward is the one recorded, and compares every
input's gradient with the gradient of the ``_ref`` op: fp32 against fp32; half precision by the
flash-attention rule against the fp32 reference (our error at most twice PyTorch's own in the same
dtype, plus a floor). Odd sizes throughout: partial row blocks and partly masked columns.
"""

from __future__ import annotations

import bert_fast.kernels as K
import pytest
import torch
from _check import DTYPES
from tolerances import FP32_OP_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

OP = "bias_act_bwd"
OP_BACKENDS = ("cpp", "triton")

pytestmark = pytest.mark.usefixtures("poison")

#: The row ops' cases: every dtype at hidden 37 (odd, below one block) and 312 (TinyBERT, % 16 != 0).
ROW_CASES = pytest.mark.parametrize("dtype, hidden", [(d, h) for d in DTYPES for h in (37, 312)])
#: Both optional inputs of a row op, present or not: every combination.
BOTH_FLAGS = [(a, b) for a in (True, False) for b in (True, False)]


def _skip_without_cpp_kernel(backend: str, op: str, device) -> None:
    """Skip a ``cpp`` case when the built extension predates the backward kernel ``op``."""
    from _check import cpp_has_kernel

    if backend == "cpp" and not cpp_has_kernel(op, device):
        pytest.skip(f"bert_fast._C has no {op} kernel")


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad if t is not None else None for t in leaves]


def _compare(backend_grads, ref32_grads, same_dtype_grads, dtype, what):
    names = iter(range(len(backend_grads)))
    for ours, ref32, same in zip(backend_grads, ref32_grads, same_dtype_grads):
        i = next(names)
        if ours is None:
            assert ref32 is None
            continue
        assert ours.dtype == same.dtype, f"{what} grad {i}: dtype {ours.dtype} != {same.dtype}"
        if dtype == torch.float32:
            # column sums over the rows: allow the fp32 summation-order error of ~rows values of O(1)
            assert_close_fp32(ours, ref32, 4 * FP32_OP_ATOL, f"{what} grad {i}")
        else:
            assert_half_rule(ours, same, ref32, HALF_OP_FACTOR, f"{what} grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ("gelu", "gelu_tanh", "relu"))
@pytest.mark.parametrize("cols", (37, 148))
@pytest.mark.parametrize("with_bias", (True, False))
def test_bias_act_backward(backend, device, dtype, activation, cols, with_bias):
    torch.manual_seed(cols + len(activation))
    rows = 33
    x = (torch.randn(3, rows // 3 + 0, cols, device=device) * 2).to(dtype)
    bias = (torch.randn(cols, device=device) * 0.5).to(dtype) if with_bias else None
    g = torch.randn(x.shape, device=device).to(dtype)

    out, ours = _grads(lambda a, b: K.bias_act(a, b, activation, backend=backend), (x, bias), g)
    assert getattr(out.grad_fn, "fused", False), "the fused backward is not the one recorded"
    _, ref32 = _grads(lambda a, b: K.bias_act_ref(a, b, activation), (x.float(), bias.float() if with_bias else None),
                      g.float())  # fmt: skip
    _, same = _grads(lambda a, b: K.bias_act_ref(a, b, activation), (x, bias), g)
    _compare(ours, ref32, same, dtype, f"bias_act[{backend},{activation},{dtype}]")


@ROW_CASES
@pytest.mark.parametrize("with_linear_bias, with_residual", BOTH_FLAGS)
def test_bias_residual_layer_norm_backward(backend, device, dtype, hidden, with_linear_bias, with_residual):
    _skip_without_cpp_kernel(backend, "bias_residual_layer_norm_bwd", device)
    torch.manual_seed(hidden)
    rows = 19
    x = (torch.randn(rows, hidden, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, device=device)).to(dtype)
    b = (0.1 * torch.randn(hidden, device=device)).to(dtype)
    lb = (0.2 * torch.randn(hidden, device=device)).to(dtype) if with_linear_bias else None
    res = torch.randn(rows, hidden, device=device).to(dtype) if with_residual else None
    g = torch.randn(rows, hidden, device=device).to(dtype)
    eps = 1e-12

    def ours_fn(x_, w_, b_, lb_, r_):
        return K.bias_residual_layer_norm(x_, w_, b_, eps, linear_bias=lb_, residual=r_, backend=backend)

    def ref_fn(x_, w_, b_, lb_, r_):
        return K.bias_residual_layer_norm_ref(x_, w_, b_, eps, lb_, r_)

    inputs = (x, w, b, lb, res)
    out, ours = _grads(ours_fn, inputs, g)
    assert getattr(out.grad_fn, "fused", False), "the fused backward is not the one recorded"
    _, ref32 = _grads(ref_fn, [t.float() if t is not None else None for t in inputs], g.float())
    _, same = _grads(ref_fn, inputs, g)
    _compare(ours, ref32, same, dtype, f"layer_norm[{backend},{hidden},{dtype}]")


def test_cpp_backward_ops_check_grad():
    from _check import cpp_has_kernel

    if not cpp_has_kernel("bias_act_bwd", "cpu"):
        pytest.skip("bert_fast._C has no bias_act_bwd kernel")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="bias_act_bwd: grad shape"):
        torch.ops.bert_fast.bias_act_bwd(torch.randn(4, 9), x, None, "gelu")
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm_bwd: grad dtype"):
        torch.ops.bert_fast.bias_residual_layer_norm_bwd(
            x.half(), x, torch.ones(8), torch.zeros(8), 1e-12, None, None
        )


def test_cpp_backward_opcheck():
    from _check import cpp_has_kernel, load_cpp_ops

    load_cpp_ops()  # kernels and fakes, as a user gets them
    if not cpp_has_kernel("bias_residual_layer_norm_bwd", "cpu"):
        pytest.skip("bert_fast._C has no backward kernels")
    x = torch.randn(5, 24)
    torch.library.opcheck(torch.ops.bert_fast.bias_act_bwd, (torch.randn(5, 24), x, torch.randn(24), "gelu_tanh"))
    torch.library.opcheck(
        torch.ops.bert_fast.bias_residual_layer_norm_bwd,
        (torch.randn(5, 24), x, torch.randn(24), torch.randn(24), 1e-5, torch.randn(24), torch.randn(5, 24)),
    )


def _embed_inputs(device, dtype, hidden, n, with_embeds, with_types):
    vocab, positions, types = 11, 9, 3
    tables = [
        torch.randn(vocab, hidden, device=device).to(dtype),
        torch.randn(positions, hidden, device=device).to(dtype),
        torch.randn(types, hidden, device=device).to(dtype),
        (1 + 0.3 * torch.randn(hidden, device=device)).to(dtype),
        (0.1 * torch.randn(hidden, device=device)).to(dtype),
    ]
    # few distinct ids, so every table row is hit by several tokens (scatter-add collisions)
    ids = torch.randint(0, 4, (n,), device=device)
    pos = torch.randint(0, positions, (n,), device=device)
    tt = torch.randint(0, types, (n,), device=device) if with_types else None
    embeds = torch.randn(n, hidden, device=device).to(dtype) if with_embeds else None
    return ids, pos, tt, tables, embeds


@ROW_CASES
@pytest.mark.parametrize("with_embeds, with_types", BOTH_FLAGS)
def test_embed_layer_norm_backward(backend, device, dtype, hidden, with_embeds, with_types):
    _skip_without_cpp_kernel(backend, "embed_layer_norm_bwd", device)
    torch.manual_seed(hidden + 2 * with_embeds + with_types)
    n, eps = 21, 1e-12
    ids, pos, tt, tables, embeds = _embed_inputs(device, dtype, hidden, n, with_embeds, with_types)
    g = torch.randn(n, hidden, device=device).to(dtype)

    def ours_fn(we, pe, te, w, b, ie):
        return K.embed_layer_norm(ids, pos, tt, we, pe, te, w, b, eps, inputs_embeds=ie, backend=backend)

    def ref_fn(we, pe, te, w, b, ie):
        return K.embed_layer_norm_ref(ids, pos, tt, we, pe, te, w, b, eps, inputs_embeds=ie)

    inputs = (*tables, embeds)
    out, ours = _grads(ours_fn, inputs, g)
    assert getattr(out.grad_fn, "fused", False), "the fused backward is not the one recorded"
    _, ref32 = _grads(ref_fn, [t.float() if t is not None else None for t in inputs], g.float())
    _, same = _grads(ref_fn, inputs, g)
    if with_embeds:
        assert ours[0] is None and ref32[0] is None  # the word table is not used
    _compare(ours, ref32, same, dtype, f"embed_layer_norm[{backend},{hidden},{dtype}]")


@pytest.mark.parametrize("deterministic", (True, False))
def test_embed_layer_norm_backward_deterministic(backend, device, deterministic):
    """Two calls give bitwise equal gradients (the C++ kernel and Triton's segmented reduction
    always; Triton's atomics path is only checked for correctness here)."""
    if backend == "cpp" and not deterministic:
        pytest.skip("the C++ kernel has one (deterministic) path")
    _skip_without_cpp_kernel(backend, "embed_layer_norm_bwd", device)
    from bert_fast.kernels.embeddings_backward import embed_layer_norm_backward

    torch.manual_seed(5)
    n, hidden = 67, 150  # several blocks of tokens and of columns
    ids, pos, tt, tables, _ = _embed_inputs(device, torch.float32, hidden, n, False, True)
    g = torch.randn(n, hidden, device=device) * 100  # large values: any change of summation order shows
    args = (g, ids, pos, tt, *tables, 1e-12, None)
    first = embed_layer_norm_backward(*args, backend=backend, deterministic=deterministic)
    second = embed_layer_norm_backward(*args, backend=backend, deterministic=deterministic)
    _, ref = _grads(lambda *t: K.embed_layer_norm_ref(ids, pos, tt, *t, 1e-12), tables, g)
    for i, (a, b, r) in enumerate(zip(first, second, ref)):
        assert_close_fp32(a, r, 400 * FP32_OP_ATOL, f"grad {i}")  # dy ~ 100: the fp32 tolerance scaled
        if deterministic:
            assert torch.equal(a, b), f"grad {i} differs between two calls"
    if backend == "cpp":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = embed_layer_norm_backward(*args, backend=backend)
        finally:
            torch.set_num_threads(threads)
        for i, (a, b) in enumerate(zip(one[:5], first[:5])):
            assert torch.equal(a, b), f"grad {i} depends on the thread count"


def test_cpp_embed_layer_norm_backward_checks():
    from _check import cpp_has_kernel, load_cpp_ops

    if not cpp_has_kernel("embed_layer_norm_bwd", "cpu"):
        pytest.skip("bert_fast._C has no embed_layer_norm_bwd kernel")
    load_cpp_ops()
    ids, pos, tt, tables, _ = _embed_inputs("cpu", torch.float32, 24, 5, False, True)
    op = torch.ops.bert_fast.embed_layer_norm_bwd
    with pytest.raises(RuntimeError, match="embed_layer_norm_bwd: grad shape"):
        op(torch.randn(5, 23), ids, pos, tt, *tables, 1e-12, None)
    with pytest.raises(RuntimeError, match="input_ids value 11 is out of range"):
        op(torch.randn(5, 24), torch.full_like(ids, 11), pos, tt, *tables, 1e-12, None)
    torch.library.opcheck(op, (torch.randn(5, 24), ids, pos, tt, *tables, 1e-5, None))
    torch.library.opcheck(op, (torch.randn(5, 24), None, pos, None, *tables, 1e-5, torch.randn(5, 24)))
