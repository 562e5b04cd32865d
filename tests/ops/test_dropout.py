"""Fused dropout: the counter-based mask (``kernels/_dropout.py``, ``csrc/cpu/dropout.h``, the Triton
helper ``_triton_utils.dropout_word``) and the C++ and Triton kernels that apply it (residual dropout
before LayerNorm, attention-probability dropout).

* The PyTorch Philox4x32-10 equals the published known-answer vectors (Random123's ``kat_vectors``),
  and the Triton kernels' words (``tl.philox``) equal the oracle's, int32 and int64 indices.
* The kernels apply exactly the oracle's mask: the forward equals the reference given the same
  seed, and the backward equals autograd through that reference (exact gradients with a fixed
  mask; a wrong or missing mask in either pass would be O(1) off, not 1e-6). Triton: fp32 under the
  interpreter (small shapes: it runs one program at a time), including launches split into chunks of
  sequences (the stream offset); bf16/fp16 at BERT shapes in the gpu tier.
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
from _check import DEVICE, HALF, packed_lengths, skip_unless_cpp, skip_unless_triton
from bert_fast.kernels import _dropout
from bert_fast.kernels import _triton_utils as _tu
from bert_fast.kernels._triton_utils import tl
from bert_fast.kernels.attention import varlen_attention_ref
from bert_fast.kernels.layer_norm import bias_residual_layer_norm_ref
from tolerances import (
    FP32_ATTN_ATOL,
    FP32_OP_ATOL,
    HALF_FLOOR,
    HALF_OP_FACTOR,
    assert_close_fp32,
    assert_half_rule,
    max_abs,
)

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


# --- Triton kernels -----------------------------------------------------------------------------


@_tu.jit
def _words_kernel(Out, Index, seed, stream, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    word = _tu.dropout_word(seed, stream.to(tl.int64), tl.load(Index + offs))
    tl.store(Out + offs, word.to(tl.int64))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_triton_philox_words_are_the_oracle(index_dtype):
    """``tl.philox`` as the kernels call it gives the oracle's words: every word position, counters
    above 2^32 (int64 indices: the counter's high word), streams above 2^32, seeds above 2^32."""
    skip_unless_triton()
    g = torch.Generator().manual_seed(4)
    high = 2**31 - 1 if index_dtype == torch.int32 else 2**40
    index = torch.cat([torch.arange(16), torch.randint(0, high, (48,), generator=g)]).to(index_dtype)
    for seed, stream in ((SEED, 3), (2**63 - 5, 2**33 + 7), (1, 0)):
        out = torch.empty(64, dtype=torch.int64, device=DEVICE)
        _words_kernel[(1,)](out, index.to(DEVICE), seed, stream, BLOCK=64)
        want = _dropout.philox_words(seed, torch.tensor(stream), index.long())
        assert torch.equal(out.cpu(), want), (seed, stream)


def _grads(fn, leaves, g):
    ts = [t.clone().requires_grad_(True) for t in leaves]
    out = fn(*ts)
    out.backward(g)
    return out, [t.grad for t in ts]


@pytest.mark.parametrize("p", [0.25, 0.6])  # 0.6: a threshold above 2^31 (unsigned compare)
@pytest.mark.parametrize("inputs", ["lb+res", "none"])
def test_layer_norm_dropout_triton_is_the_reference(p, inputs):
    """Forward equal to the reference given the seed, gradients equal to autograd through it."""
    skip_unless_triton()
    torch.manual_seed(5)
    n, h = 11, 40  # H not a power of two: masked lanes
    leaves = [torch.randn(n, h, device=DEVICE), *(torch.randn(h, device=DEVICE) for _ in range(3)),
              torch.randn(n, h, device=DEVICE)]  # fmt: skip
    g = torch.randn(n, h, device=DEVICE)
    full = inputs == "lb+res"

    def ours_fn(x, w, b, lb, r, seed=SEED):
        return K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb if full else None,
                                          residual=r if full else None, dropout_p=p, seed=seed, backend="triton")

    def ref_fn(x, w, b, lb, r):
        return bias_residual_layer_norm_ref(x, w, b, 1e-12, lb if full else None, r if full else None, p, SEED)

    ours, g_ours = _grads(ours_fn, leaves, g)
    assert ours.grad_fn.fused, "the Triton backward kernel was not used"
    ref, g_ref = _grads(ref_fn, leaves, g)
    assert_close_fp32(ours, ref, FP32_OP_ATOL, "forward")
    names = ("x", "weight", "bias", "linear_bias", "residual") if full else ("x", "weight", "bias")
    for name, a, r in zip(names, g_ours, g_ref):
        assert_close_fp32(a, r, FP32_OP_ATOL * 4, name)
    dropped = _dropout.rows_multiplier(SEED, p, n, h, DEVICE, torch.float32) == 0
    assert dropped.any() and torch.all(g_ours[0][dropped] == 0)
    if full:
        assert not torch.allclose(g_ours[0], g_ours[4])  # d residual is not dx under dropout
    with torch.no_grad():
        assert max_abs(ours_fn(*leaves, seed=SEED + 1), ours) > 0.1  # the mask matters


#: Short sequences for the interpreter: 17 spans two 16-wide tiles, 1 and 0 are the edge cases.
LENS_TRITON = (5, 17, 1, 0, 8)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-launch", "chunked"])
def test_attention_dropout_triton_is_the_reference(monkeypatch, chunked):
    """Forward and backward kernels (preprocess, dK/dV, dQ) against autograd through the reference
    with the seed's mask. ``chunked``: launches of two sequences each, as for batch * heads > 65535,
    so the dropout stream must carry the chunk's offset."""
    skip_unless_triton()
    from bert_fast.kernels import attention, attention_backward

    heads = 2
    if chunked:
        monkeypatch.setattr(attention, "_MAX_GRID_Y", 2 * heads)
        monkeypatch.setattr(attention_backward, "_MAX_GRID_Y", 2 * heads)
    torch.manual_seed(6)
    cu = packed_lengths(LENS_TRITON, DEVICE)
    n, L, p = sum(LENS_TRITON), max(LENS_TRITON), 0.3
    qkv = torch.randn(n, 3, heads, 8, device=DEVICE)
    leaves = list(qkv.unbind(1))
    g = torch.randn(n, heads, 8, device=DEVICE)
    ours, g_ours = _grads(lambda q, k, v: K.varlen_attention(q, k, v, cu, L, dropout_p=p, seed=SEED, backend="triton"),
                          leaves, g)  # fmt: skip
    assert ours.grad_fn.fused, "the Triton backward kernels were not used"
    ref, g_ref = _grads(lambda q, k, v: varlen_attention_ref(q, k, v, cu, L, None, p, SEED), leaves, g)
    _, g_plain = _grads(lambda q, k, v: varlen_attention_ref(q, k, v, cu, L), leaves, g)
    assert_close_fp32(ours, ref, FP32_ATTN_ATOL, "forward")
    for name, a, r, plain in zip("qkv", g_ours, g_ref, g_plain):
        assert_close_fp32(a, r, FP32_ATTN_ATOL, f"d{name}")
        assert max_abs(a, plain) > 1e-2, f"d{name} ignores the mask"


def test_attention_dropout_rate_in_the_triton_kernel():
    """Length-1 sequences: the output is v times the mask (drop rate p, kept scaled by 1 / (1 - p))."""
    skip_unless_triton()
    n, p = 64, 0.4  # one interpreted program per sequence: few; the mask itself is checked exactly
    cu = packed_lengths([1] * n, DEVICE)
    q = torch.randn(n, 1, 8, device=DEVICE)
    v = torch.rand(n, 1, 8, device=DEVICE) + 0.5
    out = K.varlen_attention(q, q, v, cu, 1, dropout_p=p, seed=SEED, backend="triton")
    ratio = (out[..., 0] / v[..., 0]).cpu()
    kept = ratio > 0
    _within_5_sigma(kept, p)
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), atol=0, rtol=1e-6)
    want = _dropout.keep_mask(SEED, p, torch.arange(n), torch.zeros(n, dtype=torch.int64))  # stream b, index 0
    assert torch.equal(kept.flatten(), want)


def test_triton_model_training_fuses_dropout(monkeypatch):
    """A model on the triton backend in training passes both dropouts to the Triton kernels, forward
    and backward with the same seeds, and ``torch.manual_seed`` reproduces the step."""
    skip_unless_triton()
    import transformers

    import bert_fast
    from bert_fast import _plan

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=0.2)  # fmt: skip
    model = bert_fast.BertModel(config, backend="triton").to(DEVICE).train()
    plan = _plan.plan_for(model)
    assert plan.backends["varlen_attention"] == "triton" and plan.attention_dropout
    assert plan.backends["bias_residual_layer_norm"] == "triton" and plan.layer_norm_dropout
    calls = []
    real = _tu.dropout_args
    monkeypatch.setattr(_tu, "dropout_args", lambda p, seed: calls.append((round(p, 6), seed)) or real(p, seed))
    ids = torch.randint(1, 50, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    torch.manual_seed(8)
    out = model(ids, attention_mask=mask).last_hidden_state
    (out * mask[..., None]).sum().backward()
    # forward then backward: attention (0.2) and two residual LayerNorms (0.1), each seed used twice
    by_p = {p: sorted(s for q, s in calls if q == p) for p in (0.2, 0.1)}
    assert len(by_p[0.2]) == 2 and len(by_p[0.1]) == 4, calls
    assert by_p[0.2][0] == by_p[0.2][1] and len(set(by_p[0.1])) == 2, calls
    assert by_p[0.1][0::2] == by_p[0.1][1::2], calls
    torch.manual_seed(8)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, out.detach())  # the same masks


# --- gpu tier: half precision at BERT shapes ----------------------------------------------------


def _half_rule_grads(fn, leaves, g, what):
    """``fn`` (ours, half) against the reference with the seed's mask: outputs and input gradients by
    the half-precision rule (fp32 oracle on upcast inputs, PyTorch's own half error as the scale)."""
    ours, g_ours = _grads(fn[0], leaves, g)
    same, g_same = _grads(fn[1], leaves, g)
    hi, g_hi = _grads(fn[1], [t.float() for t in leaves], g.float())
    assert_half_rule(ours, same, hi, HALF_OP_FACTOR, f"{what} forward")
    for i, (a, s, r) in enumerate(zip(g_ours, g_same, g_hi)):
        assert_half_rule(a, s, r, HALF_OP_FACTOR * 2, f"{what} gradient {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("hidden", [768, 1024])
def test_layer_norm_dropout_triton_half(dtype, hidden):
    n, p = 4096, 0.1
    leaves = [torch.randn(n, hidden, device="cuda", dtype=dtype), *(torch.randn(hidden, device="cuda", dtype=dtype)
              for _ in range(3)), torch.randn(n, hidden, device="cuda", dtype=dtype)]  # fmt: skip
    g = torch.randn(n, hidden, device="cuda", dtype=dtype)
    fns = (lambda x, w, b, lb, r: K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb, residual=r, dropout_p=p,
                                                             seed=SEED, backend="triton"),
           lambda x, w, b, lb, r: bias_residual_layer_norm_ref(x, w, b, 1e-12, lb, r, p, SEED))  # fmt: skip
    _half_rule_grads(fns, leaves, g, f"layer_norm dropout {dtype} H={hidden}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (16, 64), (12, 32)])
def test_attention_dropout_triton_half(dtype, heads, head_dim):
    from _check import bert_lengths

    lens = bert_lengths(16, 512)
    cu, L, p = packed_lengths(lens, "cuda"), max(lens), 0.1
    qkv = torch.randn(sum(lens), 3, heads, head_dim, device="cuda", dtype=dtype)
    g = torch.randn(sum(lens), heads, head_dim, device="cuda", dtype=dtype)
    fns = (lambda q, k, v: K.varlen_attention(q, k, v, cu, L, dropout_p=p, seed=SEED, backend="triton"),
           lambda q, k, v: varlen_attention_ref(q, k, v, cu, L, None, p, SEED))  # fmt: skip
    _half_rule_grads(fns, list(qkv.unbind(1)), g, f"attention dropout {dtype} {heads}x{head_dim}")
