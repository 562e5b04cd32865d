"""Fused dropout: the counter-based mask (``kernels/_dropout.py``, ``csrc/cpu/dropout.h``) and the C++
kernels that apply it (residual dropout before LayerNorm, attention-probability dropout).

* The PyTorch Philox4x32-10 equals the published known-answer vectors (Random123's ``kat_vectors``).
* The kernels apply exactly the oracle's mask: the C++ forward equals the reference given the same
  seed, and the C++ backward equals autograd through that reference (exact gradients with a fixed
  mask; a wrong or missing mask in either pass would be O(1) off, not 1e-6).
* Statistics: the drop rate over many elements is ``p`` (within 5 standard deviations) and kept
  elements are scaled by exactly ``1 / (1 - p)``; different seeds and streams give different masks.
* Seeds come from the default generator: ``torch.manual_seed`` reproduces a call.
Outputs are NaN-poisoned.
"""

from __future__ import annotations

import math

import bert_fast.kernels as K
import pytest
import torch
from _check import packed_lengths, skip_unless_cpp
from bert_fast.kernels import _dropout
from bert_fast.kernels.attention import varlen_attention_ref
from bert_fast.kernels.layer_norm import bias_residual_layer_norm_ref
from tolerances import FP32_ATTN_ATOL, FP32_OP_ATOL, HALF_FLOOR, assert_close_fp32, max_abs

pytestmark = pytest.mark.usefixtures("poison")

SEED = 0x1234_5678_9ABC  # more than 32 bits: both key words matter


def _within_5_sigma(kept: torch.Tensor, p: float) -> None:
    n = kept.numel()
    rate = 1.0 - kept.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= 5 * sigma, f"drop rate {rate:.4f} vs p={p} (n={n}, 5 sigma = {5 * sigma:.4f})"


def test_philox_known_answers():
    t = torch.tensor
    f = 0xFFFFFFFF
    cases = [  # (counter, key, output): Random123 kat_vectors, philox4x32 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((f, f, f, f), (f, f), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for ctr, key, want in cases:
        got = _dropout.philox4x32(*(t(c) for c in ctr), *key)
        assert [int(w) for w in got] == list(want)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_oracle_mask_statistics(p):
    mult = _dropout.rows_multiplier(SEED, p, 500, 777, "cpu", torch.float32)
    kept = mult > 0
    _within_5_sigma(kept, p)
    assert torch.all(mult[kept] == torch.tensor(1.0 / (1.0 - p)))
    # consecutive elements (the four words of one counter, neighbouring counters) are not correlated
    a, b = kept.flatten()[:-1].float(), kept.flatten()[1:].float()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 0.01
    other_seed = _dropout.rows_multiplier(SEED + 1, p, 500, 777, "cpu", torch.float32)
    assert (other_seed != mult).float().mean() > 0.5 * 2 * p * (1 - p)
    index = torch.arange(10_000)
    s0 = _dropout.keep_mask(SEED, p, torch.tensor(0), index)
    s1 = _dropout.keep_mask(SEED, p, torch.tensor(1), index)
    assert not torch.equal(s0, s1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (3, 5, 130)])
def test_layer_norm_dropout_cpp_is_the_reference(shape, dtype):
    skip_unless_cpp()
    torch.manual_seed(0)
    h = shape[-1]
    x, res = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b, lb = torch.randn(h), torch.randn(h), torch.randn(h)
    p = 0.3
    ours = K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb, residual=res, dropout_p=p, seed=SEED,
                                      backend="cpp")  # fmt: skip
    ref = bias_residual_layer_norm_ref(x, w, b, 1e-12, lb, res, p, SEED, upcast=True)
    floor = FP32_OP_ATOL if dtype == torch.float32 else HALF_FLOOR[dtype] * 4
    assert max_abs(ours, ref) <= floor, max_abs(ours, ref)
    # the mask matters: another seed gives another output
    other = K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb, residual=res, dropout_p=p, seed=SEED + 1,
                                       backend="cpp")  # fmt: skip
    assert max_abs(other, ours) > 0.1


def test_layer_norm_dropout_gradients_exact():
    skip_unless_cpp()
    torch.manual_seed(1)
    n, h, p = 29, 72, 0.25
    leaves = [torch.randn(n, h), torch.randn(h), torch.randn(h), torch.randn(h), torch.randn(n, h)]
    g = torch.randn(n, h)

    def grads(fn):
        ts = [t.clone().requires_grad_(True) for t in leaves]
        out = fn(*ts)
        out.backward(g)
        return out, [t.grad for t in ts]

    ours, g_ours = grads(lambda x, w, b, lb, r: K.bias_residual_layer_norm(
        x, w, b, 1e-12, linear_bias=lb, residual=r, dropout_p=p, seed=SEED, backend="cpp"))  # fmt: skip
    assert ours.grad_fn.fused, "the C++ backward kernel was not used"
    _, g_ref = grads(lambda x, w, b, lb, r: bias_residual_layer_norm_ref(x, w, b, 1e-12, lb, r, p, SEED))
    for name, a, r in zip(("x", "weight", "bias", "linear_bias", "residual"), g_ours, g_ref):
        assert_close_fp32(a, r, FP32_OP_ATOL * 4, name)
    # dropped positions give x no gradient, and the residual's gradient differs from x's
    dropped = _dropout.rows_multiplier(SEED, p, n, h, "cpu", torch.float32) == 0
    assert dropped.any() and torch.all(g_ours[0][dropped] == 0)
    assert not torch.allclose(g_ours[0], g_ours[4])


LENS = (5, 17, 1, 33, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_dropout_cpp_is_the_reference(dtype):
    skip_unless_cpp()
    torch.manual_seed(2)
    cu = packed_lengths(LENS, "cpu")
    q, k, v = torch.randn(sum(LENS), 3, 3, 16, dtype=dtype).unbind(1)  # strided views, as in the model
    p = 0.2
    ours = K.varlen_attention(q, k, v, cu, max(LENS), dropout_p=p, seed=SEED, backend="cpp")
    ref = varlen_attention_ref(q, k, v, cu, max(LENS), None, p, SEED, upcast=True)
    atol = FP32_ATTN_ATOL if dtype == torch.float32 else HALF_FLOOR[dtype] * 4
    assert max_abs(ours, ref) <= atol, max_abs(ours, ref)
    plain = K.varlen_attention(q, k, v, cu, max(LENS), backend="cpp")
    assert max_abs(ours, plain) > 0.05  # dropout did something


def test_attention_dropout_gradients_exact():
    skip_unless_cpp()
    torch.manual_seed(3)
    cu = packed_lengths(LENS, "cpu")
    leaves = [torch.randn(sum(LENS), 2, 8) for _ in range(3)]
    g = torch.randn(sum(LENS), 2, 8)
    p = 0.3

    def grads(fn):
        ts = [t.clone().requires_grad_(True) for t in leaves]
        out = fn(*ts)
        out.backward(g)
        return out, [t.grad for t in ts]

    ours, g_ours = grads(lambda q, k, v: K.varlen_attention(q, k, v, cu, max(LENS), dropout_p=p, seed=SEED,
                                                            backend="cpp"))  # fmt: skip
    assert ours.grad_fn.fused, "the C++ backward kernel was not used"
    _, g_ref = grads(lambda q, k, v: varlen_attention_ref(q, k, v, cu, max(LENS), None, p, SEED))
    _, g_plain = grads(lambda q, k, v: varlen_attention_ref(q, k, v, cu, max(LENS)))
    for name, a, r, plain in zip("qkv", g_ours, g_ref, g_plain):
        assert_close_fp32(a, r, FP32_ATTN_ATOL, f"d{name}")
        assert max_abs(a, plain) > 1e-2, f"d{name} ignores the mask"


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_attention_dropout_rate_in_the_kernel(p):
    """Sequences of length 1 have probability 1 on their one key: the output is v times the mask."""
    skip_unless_cpp()
    n, heads, d = 4000, 4, 8
    cu = packed_lengths([1] * n, "cpu")
    q, k = torch.randn(n, heads, d), torch.randn(n, heads, d)
    v = torch.rand(n, heads, d) + 0.5
    out = K.varlen_attention(q, k, v, cu, 1, dropout_p=p, seed=SEED, backend="cpp")
    ratio = out[..., 0] / v[..., 0]
    kept = ratio > 0
    _within_5_sigma(kept, p)
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), atol=0, rtol=1e-6)
    assert torch.all(out[~kept] == 0)


def test_seed_drawn_from_the_default_generator():
    skip_unless_cpp()
    x, w, b = torch.randn(8, 64), torch.ones(64), torch.zeros(64)

    def call():
        return K.bias_residual_layer_norm(x, w, b, 1e-5, dropout_p=0.5, backend="cpp")

    torch.manual_seed(11)
    first, second = call(), call()
    torch.manual_seed(11)
    again = call()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout_p_rejected(p):
    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="dropout_p"):
        K.bias_residual_layer_norm(x, w, b, 1e-5, dropout_p=p)
    cu = packed_lengths([2], "cpu")
    q = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        K.varlen_attention(q, q, q, cu, 2, dropout_p=p)
