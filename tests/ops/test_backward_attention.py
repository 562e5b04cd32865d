"""Fused backward of varlen_attention (C++ on CPU, Triton under the interpreter) against the reference.

Each case runs :func:`varlen_attention` under autograd through the public functional (so through the
dispatch's fused-backward wrapper), checks that the fused backward is the one recorded, and compares
dq, dk, dv with the gradients of :func:`varlen_attention_ref`: fp32 against fp32 at the attention
tolerance; half precision by the flash-attention rule against the fp32 reference. Lengths include
1 and 0 (an empty sequence between others); head_dim 16 (padded to 32 in Triton) and 64;
uninitialized memory is NaN-poisoned, so an unwritten gradient row fails.
"""

from __future__ import annotations

import bert_fast.kernels as K
import pytest
import torch
from _check import DTYPES, packed_lengths
from tolerances import FP32_ATTN_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

OP = "varlen_attention_bwd"
OP_BACKENDS = ("cpp", "triton")

pytestmark = pytest.mark.usefixtures("poison")


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", (16, 64))
@pytest.mark.parametrize("lens", ((5, 1, 0, 21), (1,), (17, 17)))
def test_varlen_attention_backward(backend, device, dtype, head_dim, lens):
    torch.manual_seed(head_dim + sum(lens))
    heads = 2
    cu = packed_lengths(lens, device)
    n, max_len = sum(lens), max(lens)
    q, k, v = (torch.randn(n, heads, head_dim, device=device).to(dtype) for _ in range(3))
    g = torch.randn(n, heads, head_dim, device=device).to(dtype)
    scale = 0.7 / head_dim**0.5

    out, ours = _grads(lambda a, b, c: K.varlen_attention(a, b, c, cu, max_len, scale=scale, backend=backend),
                       (q, k, v), g)  # fmt: skip
    assert getattr(out.grad_fn, "fused", False), "the fused backward is not the one recorded"
    _, ref32 = _grads(lambda a, b, c: K.varlen_attention_ref(a, b, c, cu, max_len, scale), (q.float(), k.float(),
                      v.float()), g.float())  # fmt: skip
    _, same = _grads(lambda a, b, c: K.varlen_attention_ref(a, b, c, cu, max_len, scale), (q, k, v), g)
    for name, o, r, s in zip("qkv", ours, ref32, same):
        what = f"d{name}[{backend},{dtype},d={head_dim},lens={lens}]"
        assert o.dtype == dtype and o.shape == r.shape, what
        if dtype == torch.float32:
            assert_close_fp32(o, r, FP32_ATTN_ATOL, what)
        else:
            assert_half_rule(o, s, r, HALF_OP_FACTOR, what)


def test_varlen_attention_backward_strided_views(backend, device):
    """q, k, v as views into one fused (N, 3 * hidden) projection output, as the model passes them."""
    torch.manual_seed(3)
    lens, heads, d = (7, 0, 12, 1), 2, 16
    cu = packed_lengths(lens, device)
    n = sum(lens)
    qkv = torch.randn(n, 3 * heads * d, device=device)
    g = torch.randn(n, heads, d, device=device)

    def split(t):
        return [t[:, i * heads * d:(i + 1) * heads * d].view(n, heads, d) for i in range(3)]

    leaf = qkv.clone().requires_grad_(True)
    K.varlen_attention(*split(leaf), cu, max(lens), backend=backend).backward(g)
    ref = qkv.clone().requires_grad_(True)
    K.varlen_attention_ref(*split(ref), cu, max(lens)).backward(g)
    assert_close_fp32(leaf.grad, ref.grad, FP32_ATTN_ATOL, f"dqkv[{backend}]")


@pytest.mark.backends("cpp")
def test_cpp_varlen_attention_backward_checks_and_threads(backend):
    q = torch.randn(9, 2, 8)
    cu = packed_lengths((4, 5), "cpu")
    g = torch.randn(9, 2, 8)
    with pytest.raises(RuntimeError, match="varlen_attention_bwd: grad shape"):
        torch.ops.bert_fast.varlen_attention_bwd(torch.randn(9, 2, 7), q, q, q, cu, 5, 0.3)
    with pytest.raises(RuntimeError, match="must equal the number of tokens"):
        torch.ops.bert_fast.varlen_attention_bwd(g, q, q, q, packed_lengths((4, 4), "cpu"), 5, 0.3)
    with pytest.raises(RuntimeError, match="> max_seqlen"):
        torch.ops.bert_fast.varlen_attention_bwd(g, q, q, q, cu, 4, 0.3)
    # each task writes its own slices: the result does not depend on the thread count
    threads = torch.get_num_threads()
    k, v = torch.randn_like(q), torch.randn_like(q)
    try:
        torch.set_num_threads(1)
        one = torch.ops.bert_fast.varlen_attention_bwd(g, q, k, v, cu, 5, 0.3)
    finally:
        torch.set_num_threads(threads)
    many = torch.ops.bert_fast.varlen_attention_bwd(g, q, k, v, cu, 5, 0.3)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.backends("cpp")
def test_cpp_varlen_attention_backward_opcheck(backend):
    from _check import load_cpp_ops

    load_cpp_ops()
    q, k, v, g = (torch.randn(6, 2, 8) for _ in range(4))
    torch.library.opcheck(torch.ops.bert_fast.varlen_attention_bwd, (g, q, k, v, packed_lengths((2, 0, 4), "cpu"),
                                                                      4, 0.35))  # fmt: skip
