"""``varlen_attention`` on every backend against ``varlen_attention_ref``.

CPU tier: packed batches with empty, length-1, odd and long sequences; head_dim 26/32/64; q, k, v
as strided views of the fused QKV projection, contiguous or transposed; int32 and int64
``cu_seqlens``; scores of ~1e5 (softmax must not overflow); batches of only empty sequences;
determinism; gradients (reference backward); opcheck; the C++ errors; the BLAS-free C++ path.
gpu tier: BERT-base/large at (32, 512), (32, 128), (8, 37), head_dim 26..128, more programs than
one grid dimension holds (``gpu_quick``: BERT-base 32x128 per dtype). Fuzzing at the end.
Outputs are NaN-poisoned throughout.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import _check
import bert_fast.kernels as K
import pytest
import torch
from _check import (
    BERT_SHAPES,
    DEVICE,
    DTYPES,
    bert_lengths,
    check_op,
    fuzz_settings,
    load_cpp_ops,
    packed_lengths,
    skip_unless_cpp,
    skip_unless_triton,
    usable_dtypes,
)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import FP32_ATTN_ATOL, FP32_OP_ATOL, HALF_FLOOR, HALF_OP_FACTOR, assert_close_fp32

OP = "varlen_attention"

#: A length-1 sequence, odd lengths, an empty one, a long one.
LENS = (1, 7, 33, 0, 37, 300, 2)
#: The same edge cases, short enough for the Triton interpreter (one program at a time).
LENS_INTERPRETER = (1, 7, 0, 33, 37)

pytestmark = pytest.mark.usefixtures("poison")


def _run(backend, q, k, v, cu, max_len, scale=None, **kw):
    return K.varlen_attention(q, k, v, cu, max_len, scale=scale, backend=backend, **kw)


def _ref_with(cu, max_len, scale=None):
    return lambda q, k, v: K.varlen_attention_ref(q, k, v, cu, max_len, scale)


def packed_qkv(lens, heads, d, dtype, device, layout="fused"):
    """q, k, v for packed sequences of ``lens``; ``fused``: strided views of one (N, 3 * hidden)
    projection output, as the model has them (no copy)."""
    cu = packed_lengths(lens, device)
    n = sum(lens)
    if layout == "fused":
        qkv = torch.randn(n, 3 * heads * d, device=device).to(dtype)
        q, k, v = qkv.view(n, 3, heads, d).unbind(1)
        assert q.stride() == (3 * heads * d, d, 1)
    elif layout == "contiguous":
        q, k, v = (torch.randn(n, heads, d, device=device).to(dtype) for _ in range(3))
    else:  # (heads, N, d) transposed
        q, k, v = (torch.randn(heads, n, d, device=device).to(dtype).transpose(0, 1) for _ in range(3))
    return q, k, v, cu


def _lens_for(backend, device, heads):
    """The long batch for the compiled kernels; short ones for the interpreter (one program at a
    time) and for the reference (the oracle itself)."""
    if backend == "cpp" or device != "cpu":
        return LENS
    return LENS_INTERPRETER if heads <= 2 else (1, 0, 9)


# --- CPU tier -----------------------------------------------------------------------------------


@pytest.mark.backends("cpp", "triton")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [(2, 26), (4, 32), (12, 64)])
def test_matches_reference(backend, device, dtype, heads, d):
    lens = _lens_for(backend, device, heads)
    q, k, v, cu = packed_qkv(lens, heads, d, dtype, device)
    scale = 0.3 if d == 32 else 1.0 / math.sqrt(d)  # one non-default scale
    ours = _run(backend, q, k, v, cu, max(lens), scale)
    assert ours.shape == q.shape and ours.is_contiguous()
    check_op(ours, _ref_with(cu, max(lens), scale), (q, k, v), atol=FP32_ATTN_ATOL,
             what=f"{backend} {dtype} heads={heads} d={d}")


@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
def test_layouts_and_int64_offsets(backend, device, layout):
    lens = (5, 0, 17)
    q, k, v, cu = packed_qkv(lens, 3, 32, torch.float32, device, layout)
    cu = cu.long()
    ours = _run(backend, q, k, v, cu, max(lens), 0.3)
    assert_close_fp32(ours, K.varlen_attention_ref(q, k, v, cu, max(lens), 0.3), FP32_ATTN_ATOL, layout)


def test_large_scores_and_empty_batch(backend, device):
    q, k, v, cu = packed_qkv((9, 0, 4), 2, 26, torch.float32, device)
    ours = _run(backend, q * 100, k * 100, v, cu, 9, 1.0)  # scores ~ 1e5: softmax must not overflow
    assert torch.isfinite(ours).all()
    ref = K.varlen_attention_ref(q * 100, k * 100, v, cu, 9, 1.0)
    assert_close_fp32(ours, ref, FP32_ATTN_ATOL, f"{backend} large scores")
    empty = torch.zeros(0, 2, 26, device=device)
    out = _run(backend, empty, empty, empty, torch.zeros(3, dtype=torch.int32, device=device), 0, 1.0)
    assert out.shape == (0, 2, 26)


def test_only_empty_and_single_token_batches(backend, device):
    """Only empty sequences; a single length-1 sequence (softmax over one key = v itself)."""
    q, k, v, cu = packed_qkv((0, 0), 2, 32, torch.float32, device)
    assert _run(backend, q, k, v, cu, 0).shape == (0, 2, 32)
    q, k, v, cu = packed_qkv((1,), 2, 32, torch.float32, device)
    assert_close_fp32(_run(backend, q, k, v, cu, 1), v.contiguous(), FP32_OP_ATOL, f"{backend} length 1")


@pytest.mark.backends("torch", "cpp")  # determinism on CPU (the fuzz tests check every backend)
def test_identical_calls_are_bitwise_equal(backend, device):
    q, k, v, cu = packed_qkv((5, 0, 17, 1), 2, 32, torch.float32, device)
    first = _run(backend, q, k, v, cu, 17)
    assert torch.equal(first, _run(backend, q, k, v, cu, 17)), f"{backend}: two identical calls differ"


@pytest.mark.backends("cpp", "triton")
def test_gradients_equal_reference(backend, device):
    q0, k0, v0, cu = packed_qkv((3, 0, 6), 2, 26, torch.float32, device)
    _check.assert_grads_match_torch(lambda be, q, k, v: _run(be, q, k, v, cu, 6), (q0, k0, v0), backend, FP32_ATTN_ATOL)


def test_triton_unsupported_raises_auto_falls_back():
    skip_unless_triton()
    q, k, v, cu = packed_qkv((3, 5), 1, 256, torch.float32, DEVICE)  # head_dim 256 > 128
    with pytest.raises(K.BackendUnavailableError, match="head_dim 256"):
        _run("triton", q, k, v, cu, 5)
    out = K.varlen_attention(q, k, v, cu, 5, backend="auto")
    assert_close_fp32(out, K.varlen_attention_ref(q, k, v, cu, 5), FP32_ATTN_ATOL, "fallback")
    # dropout is fused (tests/ops/test_dropout.py) while max_seqlen^2 < 2^31 (its int32 mask index)
    with pytest.raises(K.BackendUnavailableError, match="dropout"):
        _run("triton", q[..., :32], k[..., :32], v[..., :32], cu, 50_000, dropout_p=0.1)


def test_triton_chunked_launch(monkeypatch):
    """More (batch * heads) programs than one grid dimension holds: launched in chunks of sequences.

    Shrinks the launcher's grid limit so that a small batch takes several launches under the
    interpreter (the gpu tier runs the real limit, ``test_more_programs_than_grid_dim``).
    """
    skip_unless_triton()
    import importlib

    attention_mod = importlib.import_module("bert_fast.kernels.attention")
    if not hasattr(attention_mod, "_MAX_GRID_Y"):
        pytest.skip("the attention launcher no longer exposes its grid limit (_MAX_GRID_Y)")
    monkeypatch.setattr(attention_mod, "_MAX_GRID_Y", 4)  # 2 heads -> 2 sequences per launch
    q, k, v, cu = packed_qkv((5, 0, 17, 1, 9), 2, 32, torch.float32, DEVICE)
    ours = _run("triton", q, k, v, cu, 17)
    assert_close_fp32(ours, K.varlen_attention_ref(q, k, v, cu, 17), FP32_ATTN_ATOL, "chunked")


def test_cpp_without_blas():
    """The at::vec GEMM fallback (no BLAS symbols; forced by BERT_FAST_ATTN_BLAS=0, read once per process)."""
    skip_unless_cpp()
    code = (
        "import torch\n"
        "import bert_fast._C\n"
        "from bert_fast import kernels as K\n"
        "torch.manual_seed(0)\n"
        "cu = torch.tensor([0, 3, 3, 44, 45], dtype=torch.int32)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    qkv = torch.randn(45, 3 * 2 * 26, dtype=dt)\n"
        "    q, k, v = (t.view(45, 2, 26) for t in qkv.split(52, dim=1))\n"
        "    o = torch.ops.bert_fast.varlen_attention(q, k, v, cu, 41, 0.2)\n"
        "    r = K.varlen_attention_ref(q.float(), k.float(), v.float(), cu, 41, 0.2)\n"
        "    t = K.varlen_attention_ref(q, k, v, cu, 41, 0.2)\n"
        "    print(dt, (o.float() - r).abs().max().item(), (t.float() - r).abs().max().item())\n"
    )
    env = dict(os.environ, BERT_FAST_ATTN_BLAS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    fp32_err = float(lines[0].split()[1])
    bf16_err, bf16_torch = (float(s) for s in lines[1].split()[1:])
    assert fp32_err <= FP32_ATTN_ATOL, lines
    assert bf16_err <= HALF_OP_FACTOR * bf16_torch + HALF_FLOOR[torch.bfloat16], lines


def test_opcheck():
    load_cpp_ops()
    q, k, v, cu = packed_qkv((3, 0, 6), 2, 26, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.bert_fast.varlen_attention.default, (q, k, v, cu, 6, 0.2))


def test_cpp_errors():
    skip_unless_cpp()
    op = torch.ops.bert_fast.varlen_attention
    q, k, v, cu = packed_qkv((3, 4), 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] = 6 must equal the number of tokens 7"):
        op(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match=r"sequence 1 has length 4 > max_seqlen 3"):
        op(q, k, v, cu, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"k dtype BFloat16 != q dtype Float"):
        op(q, k.bfloat16(), v, cu, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be int64 or int32, got Float"):
        op(q, k, v, cu.float(), 4, 1.0)


# --- gpu tier: BERT shapes ----------------------------------------------------------------------


@pytest.mark.backends("triton", "cpp")
@pytest.mark.parametrize(
    "dtype,model,batch,max_len",
    _check.bert_cases(((32, 512), (32, 128), (8, 37)), quick=(32, 128), label=lambda v: f"{v[0]}x{v[1]}"),
)
def test_bert_shapes(backend, device, dtype, model, batch, max_len):
    hidden, heads = BERT_SHAPES[model]
    lens = bert_lengths(batch, max_len)
    q, k, v, cu = packed_qkv(lens, heads, hidden // heads, dtype, device)
    ours = _run(backend, q, k, v, cu, max_len)
    assert ours.shape == q.shape and ours.is_contiguous()
    check_op(ours, _ref_with(cu, max_len), (q, k, v), atol=FP32_ATTN_ATOL,
             what=f"{backend} {model} {dtype} B={batch} L={max_len}", oracle=torch.float64)


@pytest.mark.gpu
@pytest.mark.backends("triton", "cpp")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [26, 32, 40, 80, 96, 128])
def test_head_dims(backend, device, dtype, head_dim):
    lens = bert_lengths(6, 200)
    q, k, v, cu = packed_qkv(lens, 4, head_dim, dtype, device)
    scale = 1.0 / math.sqrt(head_dim)
    ours = _run(backend, q, k, v, cu, max(lens), scale)
    check_op(ours, _ref_with(cu, max(lens), scale), (q, k, v), atol=FP32_ATTN_ATOL,
             what=f"{backend} d={head_dim} {dtype}", oracle=torch.float64)


@pytest.mark.gpu
@pytest.mark.backends("triton", "cpp")
def test_more_programs_than_grid_dim(backend, device):
    """batch * heads > 65535: launched in chunks of sequences."""
    batch, heads, d = 4200, 16, 64
    q, k, v, cu = packed_qkv([2] * batch, heads, d, torch.float16, device)
    ours = _run(backend, q, k, v, cu, 2)
    check_op(ours, _ref_with(cu, 2), (q, k, v), atol=FP32_ATTN_ATOL, what=f"{backend} chunked launch",
             oracle=torch.float64)


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random packed batches (all-empty, length-1, odd lengths), head counts and dims, dtypes,
    layouts (fused QKV views, contiguous, transposed), int32/int64 offsets, scales."""
    interp = backend == "triton" and device == "cpu"

    @fuzz_settings(backend, device)
    @given(
        lens=st.lists(st.integers(0, 19 if interp else 70), min_size=1, max_size=3 if interp else 5),
        heads=st.sampled_from([1, 2, 3]),
        d=st.sampled_from([1, 8, 13, 26, 32, 64] if not interp else [8, 13, 26, 32]),
        dtype=st.sampled_from(usable_dtypes(backend, device)),
        layout=st.sampled_from(["fused", "contiguous", "transposed"]),
        offsets_int64=st.booleans(),
        scale=st.sampled_from([None, 0.05, 1.0]),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(lens, heads, d, dtype, layout, offsets_int64, scale, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        q, k, v, cu = packed_qkv(lens, heads, d, dtype, device, layout)
        if offsets_int64:
            cu = cu.long()
        max_len = max(lens)
        ours = _run(backend, q, k, v, cu, max_len, scale)
        assert torch.isfinite(ours).all(), "non-finite output"
        what = f"{backend} {dtype} lens={lens} heads={heads} d={d} {layout}"
        check_op(ours, _ref_with(cu, max_len, scale), (q, k, v), atol=FP32_ATTN_ATOL, what=what)
        assert torch.equal(ours, _run(backend, q, k, v, cu, max_len, scale)), f"{what}: two calls differ"

    case()
