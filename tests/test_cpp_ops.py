"""The C++ extension ``bert_fast._C`` (backend ``cpp``) against the ``_ref`` oracles, on CPU.

fp32: max abs diff within tests/tolerances.py; bf16/fp16: the flash-attention rule against the
fp32 reference, next to PyTorch's own error in the same dtype. Also: torch.library.opcheck for
every operator (schemas, fake implementations, dispatch), gradients through the public
functions, and the error messages for bad inputs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from bert_fast.kernels import _backend

from bert_fast import kernels as K

if _backend.load_cpp_extension() is None:
    pytest.skip("bert_fast._C is not built (pip install --no-build-isolation -e . builds it)", allow_module_level=True)

from bert_fast.kernels import _cpp  # noqa: E402
from tolerances import (  # noqa: E402
    FP32_ATTN_ATOL,
    FP32_OP_ATOL,
    HALF_OP_FACTOR,
    assert_close_fp32,
    assert_half_rule,
)

HALF = (torch.bfloat16, torch.float16)
HIDDENS = (37, 312, 384, 768)
EPS = 1e-12


def _f32(*ts):
    return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in ts]


def _check(ours, ref_fn, args, dtype, atol, what):
    """fp32: ours vs ref; half: ours vs fp32 ref, with torch's own half error as the yardstick."""
    if dtype == torch.float32:
        assert_close_fp32(ours, ref_fn(*args), atol, what)
    else:
        ref32 = ref_fn(*_f32(*args))
        assert_half_rule(ours, ref_fn(*args), ref32, HALF_OP_FACTOR, what)


# --- bias + residual + LayerNorm ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("with_lb,with_res", [(False, False), (True, False), (False, True), (True, True)])
def test_bias_residual_layer_norm(dtype, hidden, with_lb, with_res):
    x = torch.randn(33, hidden, dtype=dtype) * 2 + 0.5
    w, b = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    lb = torch.randn(hidden, dtype=dtype) if with_lb else None
    res = torch.randn(33, hidden, dtype=dtype) if with_res else None
    ours = K.bias_residual_layer_norm(x, w, b, EPS, linear_bias=lb, residual=res, backend="cpp")
    assert ours.dtype == dtype and ours.is_contiguous()
    _check(
        ours,
        lambda *a: K.bias_residual_layer_norm_ref(*a),
        (x, w, b, EPS, lb, res),
        dtype,
        FP32_OP_ATOL,
        f"brln {dtype} H={hidden}",
    )


def test_bias_residual_layer_norm_strided_and_3d():
    base = torch.randn(2, 7, 2 * 312)
    x = base[..., :312]  # row stride 624, last dim contiguous
    res = torch.randn(2, 7, 312)
    w, b = torch.randn(312), torch.randn(312)
    ours = _cpp.bias_residual_layer_norm(x, w, b, 1e-5, None, res)
    assert_close_fp32(ours, K.bias_residual_layer_norm_ref(x, w, b, 1e-5, None, res), FP32_OP_ATOL, "strided")


def test_bias_residual_layer_norm_fp32_params_with_bf16_input():
    x = torch.randn(7, 384, dtype=torch.bfloat16)
    w, b = torch.randn(384), torch.randn(384)
    ours = _cpp.bias_residual_layer_norm(x, w, b, EPS, None, None)
    ref32 = K.bias_residual_layer_norm_ref(x.float(), w, b, EPS)
    torch_bf16 = K.bias_residual_layer_norm_ref(x, w.bfloat16(), b.bfloat16(), EPS)
    assert_half_rule(ours, torch_bf16, ref32, HALF_OP_FACTOR, "fp32 params")


# --- bias + activation --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("activation", K.ACTIVATIONS)
@pytest.mark.parametrize("cols", (37, 312, 3072))
@pytest.mark.parametrize("with_bias", (True, False))
def test_bias_act(dtype, activation, cols, with_bias):
    x = torch.randn(7, cols, dtype=dtype) * 3
    bias = torch.randn(cols, dtype=dtype) if with_bias else None
    ours = K.bias_act(x, bias, activation, backend="cpp")
    assert ours.dtype == dtype and ours.shape == x.shape
    _check(
        ours,
        lambda x, b: K.bias_act_ref(x, b, activation),
        (x, bias),
        dtype,
        FP32_OP_ATOL,
        f"bias_act {activation} {dtype}",
    )


def test_bias_act_extreme_values():
    # finite extremes only: at +inf PyTorch's own CPU GELU returns NaN (inf * 0 inside), ours inf
    x = torch.tensor([[-1e4, -100.0, -20.0, -5.0, -1e-6, 0.0, 1e-6, 5.0, 20.0, 100.0, 1e4]])
    for act in K.ACTIVATIONS:
        assert_close_fp32(_cpp.bias_act(x, None, act), K.bias_act_ref(x, None, act), FP32_OP_ATOL, act)
    nan = torch.tensor([[float("nan"), 1.0]])
    for act in K.ACTIVATIONS:
        assert torch.isnan(_cpp.bias_act(nan, None, act)[0, 0]), act  # NaN propagates


# --- embeddings + LayerNorm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("with_types", (True, False))
@pytest.mark.parametrize("use_embeds", (False, True))
def test_embed_layer_norm(dtype, hidden, with_types, use_embeds):
    n = 37
    we, pe, te = (torch.randn(r, hidden, dtype=dtype) for r in (101, 64, 2))
    w, b = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    ids = torch.randint(0, 101, (n,))
    pos = torch.randint(0, 64, (n,), dtype=torch.int32)
    tt = torch.randint(0, 2, (n,)) if with_types else None
    embeds = torch.randn(n, hidden, dtype=dtype) if use_embeds else None
    ours = K.embed_layer_norm(
        None if use_embeds else ids, pos, tt, we, pe, te, w, b, EPS, inputs_embeds=embeds, backend="cpp"
    )
    assert ours.shape == (n, hidden) and ours.dtype == dtype

    def ref(we, pe, te, w, b, embeds):
        return K.embed_layer_norm_ref(
            None if use_embeds else ids, pos.long(), tt, we, pe, te, w, b, EPS, inputs_embeds=embeds
        )

    _check(ours, ref, (we, pe, te, w, b, embeds), dtype, FP32_OP_ATOL, f"embed {dtype} H={hidden}")


# --- varlen attention ---------------------------------------------------------------------------

LENS = (1, 7, 33, 0, 37, 300, 2)


def _packed_qkv(lens, heads, d, dtype, layout="fused"):
    n = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    if layout == "fused":  # views into a fused (N, 3 * hidden) projection output, as in the model
        qkv = torch.randn(n, 3 * heads * d, dtype=dtype)
        q, k, v = (t.view(n, heads, d) for t in qkv.split(heads * d, dim=1))
        assert q.stride() == (3 * heads * d, d, 1)
    elif layout == "contiguous":
        q, k, v = (torch.randn(n, heads, d, dtype=dtype) for _ in range(3))
    else:  # (heads, N, d) transposed
        q, k, v = (torch.randn(heads, n, d, dtype=dtype).transpose(0, 1) for _ in range(3))
    return q, k, v, cu


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("heads,d", [(2, 26), (4, 32), (12, 64)])
def test_varlen_attention(dtype, heads, d):
    q, k, v, cu = _packed_qkv(LENS, heads, d, dtype)
    scale = 1 / math.sqrt(d)
    ours = K.varlen_attention(q, k, v, cu, max(LENS), scale=scale, backend="cpp")
    assert ours.shape == q.shape and ours.is_contiguous() and ours.dtype == dtype

    def ref(q, k, v):
        return K.varlen_attention_ref(q, k, v, cu, max(LENS), scale)

    _check(ours, ref, (q, k, v), dtype, FP32_ATTN_ATOL, f"attention {dtype} heads={heads} d={d}")


@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
def test_varlen_attention_layouts(layout):
    lens = (5, 0, 17)
    q, k, v, cu = _packed_qkv(lens, 3, 32, torch.float32, layout)
    ours = _cpp.varlen_attention(q, k, v, cu.long(), max(lens), 0.3)
    assert_close_fp32(ours, K.varlen_attention_ref(q, k, v, cu, max(lens), 0.3), FP32_ATTN_ATOL, layout)


def test_varlen_attention_large_scores_and_empty():
    q, k, v, cu = _packed_qkv((9, 0, 4), 2, 26, torch.float32)
    ours = _cpp.varlen_attention(q * 100, k * 100, v, cu, 9, 1.0)  # scores ~ 1e5: softmax must not overflow
    assert torch.isfinite(ours).all()
    assert_close_fp32(ours, K.varlen_attention_ref(q * 100, k * 100, v, cu, 9, 1.0), FP32_ATTN_ATOL, "large")
    empty = torch.zeros(0, 2, 26)
    out = _cpp.varlen_attention(empty, empty, empty, torch.zeros(3, dtype=torch.int32), 0, 1.0)
    assert out.shape == (0, 2, 26)


def test_varlen_attention_without_blas():
    """The at::vec GEMM fallback (no BLAS symbols; forced by BERT_FAST_ATTN_BLAS=0, read once per process)."""
    code = (
        "import math, torch\n"
        "from bert_fast import kernels as K\n"
        "from bert_fast.kernels import _cpp\n"
        "torch.manual_seed(0)\n"
        "lens = (3, 0, 41, 1)\n"
        "cu = torch.tensor([0, 3, 3, 44, 45], dtype=torch.int32)\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    qkv = torch.randn(45, 3 * 2 * 26, dtype=dt)\n"
        "    q, k, v = (t.view(45, 2, 26) for t in qkv.split(52, dim=1))\n"
        "    o = _cpp.varlen_attention(q, k, v, cu, 41, 0.2)\n"
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
    assert bf16_err <= HALF_OP_FACTOR * bf16_torch + 8e-3, lines


# --- padding machinery --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.bool, torch.int64, torch.int32, torch.float32, torch.bfloat16))
def test_unpad_mask(dtype):
    mask = (torch.rand(6, 37) > 0.3).to(dtype)
    mask[2] = 0  # a row that is all padding
    mask[4] = 1
    if dtype.is_floating_point:
        mask[0, :3] = torch.tensor([0.5, -2.0, float("nan")], dtype=dtype)  # nonzero (and NaN != 0) = token
    ours = K.unpad_mask(mask, backend="cpp")
    ref = K.unpad_mask_ref(mask)
    assert torch.equal(ours[0], ref[0]) and ours[0].dtype == torch.int64
    assert torch.equal(ours[1], ref[1]) and ours[1].dtype == torch.int32
    assert ours[2] == ref[2] and type(ours[2]) is int


def test_unpad_mask_empty_batch():
    ours = _cpp.unpad_mask(torch.zeros(0, 5, dtype=torch.bool))
    ref = K.unpad_mask_ref(torch.zeros(0, 5, dtype=torch.bool))
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]) and ours[2] == ref[2] == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.int64))
@pytest.mark.parametrize("hidden", (37, 768))
def test_gather_scatter_rows(dtype, hidden):
    mask = torch.rand(4, 33) > 0.4
    mask[1] = False
    indices, _, _ = K.unpad_mask_ref(mask)
    x = (torch.randn(mask.numel(), hidden) * 10).to(dtype)
    packed = K.gather_rows(x, indices, backend="cpp")
    assert torch.equal(packed, K.gather_rows_ref(x, indices))
    back = K.scatter_rows(packed, indices, mask.numel(), backend="cpp")
    assert torch.equal(back, K.scatter_rows_ref(packed, indices, mask.numel()))
    assert torch.equal(_cpp.gather_rows(x, indices.int()), packed)  # int32 indices too


# --- opcheck: schemas, fake implementations, dispatch -------------------------------------------


def _opcheck_cases():
    h = 37
    x, res = torch.randn(5, h), torch.randn(5, h)
    w, b, lb = torch.randn(h), torch.randn(h), torch.randn(h)
    we, pe, te = torch.randn(20, h), torch.randn(16, h), torch.randn(2, h)
    ids, pos, tt = torch.randint(0, 20, (5,)), torch.arange(5), torch.randint(0, 2, (5,))
    q, k, v, cu = _packed_qkv((3, 0, 6), 2, 26, torch.float32)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    idx = torch.tensor([0, 1, 3])
    ops = torch.ops.bert_fast
    return [
        (ops.bias_residual_layer_norm.default, (x, w, b, 1e-12, lb, res)),
        (ops.bias_residual_layer_norm.default, (x.bfloat16(), w, b, 1e-5, None, None)),
        (ops.bias_act.default, (x, lb, "gelu")),
        (ops.bias_act.default, (x.bfloat16(), None, "gelu_tanh")),
        (ops.embed_layer_norm.default, (ids, pos, tt, we, pe, te, w, b, 1e-12, None)),
        (ops.embed_layer_norm.default, (None, pos, None, we, pe, te, w, b, 1e-12, x)),
        (ops.varlen_attention.default, (q, k, v, cu, 6, 0.2)),
        (ops.unpad_mask.default, (mask,)),
        (ops.gather_rows.default, (x, idx)),
        (ops.scatter_rows.default, (x[:3], idx, 6)),
        (ops.linear.default, (x, torch.randn(7, h), torch.randn(7))),
        (ops.linear.default, (torch.randn(300, h).bfloat16(), torch.randn(7, h).bfloat16(), None)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_all_ops_registered():
    for name in _cpp.OPS:
        assert hasattr(torch.ops.bert_fast, name)


# --- gradients through the public functions (fused forward, reference backward) ----------------


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    g = torch.randn_like(out)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _assert_same_grads(cpp_fn, ref_fn, tensors, atol):
    out_c, g_c = _grads(cpp_fn, tensors)
    torch.manual_seed(1)
    out_r, g_r = _grads(ref_fn, tensors)
    assert_close_fp32(out_c, out_r, atol, "forward")
    for gc, gr in zip(g_c, g_r):
        if gr is not None:
            assert_close_fp32(gc, gr, atol, "grad")


def test_gradients():
    torch.manual_seed(0)
    h = 37
    x, res, w, b, lb = torch.randn(5, h), torch.randn(5, h), torch.randn(h), torch.randn(h), torch.randn(h)

    def brln(backend):
        return lambda x, w, b, lb, res: K.bias_residual_layer_norm(
            x, w, b, 1e-12, linear_bias=lb, residual=res, backend=backend
        )

    torch.manual_seed(1)
    _assert_same_grads(brln("cpp"), brln("torch"), (x, w, b, lb, res), 1e-4)

    def act(backend):
        return lambda x, lb: K.bias_act(x, lb, "gelu", backend=backend)

    torch.manual_seed(1)
    _assert_same_grads(act("cpp"), act("torch"), (x, lb), 1e-4)

    we, pe, te = torch.randn(20, h), torch.randn(16, h), torch.randn(2, h)
    ids, pos = torch.randint(0, 20, (5,)), torch.arange(5)

    def emb(backend):
        return lambda we, pe, te, w, b: K.embed_layer_norm(ids, pos, None, we, pe, te, w, b, 1e-12, backend=backend)

    torch.manual_seed(1)
    _assert_same_grads(emb("cpp"), emb("torch"), (we, pe, te, w, b), 1e-4)

    q, k, v, cu = _packed_qkv((3, 0, 6), 2, 26, torch.float32)

    def attn(backend):
        return lambda q, k, v: K.varlen_attention(q, k, v, cu, 6, backend=backend)

    torch.manual_seed(1)
    _assert_same_grads(attn("cpp"), attn("torch"), (q, k, v), 1e-4)


# --- clear errors for bad inputs ----------------------------------------------------------------


def test_errors():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(RuntimeError, match=r"layer_norm: x must be float32, bfloat16 or float16, got Long"):
        _cpp.bias_residual_layer_norm(x.long(), w, b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\), got \[7\]"):
        _cpp.bias_residual_layer_norm(x, w[:7], b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"x must be contiguous in its last dimension .* got stride 4"):
        _cpp.bias_residual_layer_norm(torch.randn(8, 4).t(), w, b, 1e-5, None, None)
    with pytest.raises(RuntimeError, match=r"residual dtype BFloat16 != x dtype Float"):
        _cpp.bias_residual_layer_norm(x, w, b, 1e-5, None, x.bfloat16())
    with pytest.raises(RuntimeError, match=r"unknown activation 'swish'"):
        _cpp.bias_act(x, None, "swish")
    we, pe, te = torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"input_ids value 10 is out of range \[0, 10\)"):
        _cpp.embed_layer_norm(torch.tensor([1, 10]), torch.tensor([0, 1]), None, we, pe, te, w, b, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"position_ids value -1 is out of range"):
        _cpp.embed_layer_norm(torch.tensor([1, 2]), torch.tensor([0, -1]), None, we, pe, te, w, b, 1e-5, None)
    q, k, v, cu = _packed_qkv((3, 4), 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[-1\] = 6 must equal the number of tokens 7"):
        _cpp.varlen_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match=r"sequence 1 has length 4 > max_seqlen 3"):
        _cpp.varlen_attention(q, k, v, cu, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"k dtype BFloat16 != q dtype Float"):
        _cpp.varlen_attention(q, k.bfloat16(), v, cu, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be int64 or int32, got Float"):
        _cpp.varlen_attention(q, k, v, cu.float(), 4, 1.0)
    with pytest.raises(RuntimeError, match=r"gather_rows: index 9 is out of range \[0, 4\)"):
        _cpp.gather_rows(x, torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match=r"scatter_rows: index 5 is out of range \[0, 5\)"):
        _cpp.scatter_rows(x[:2], torch.tensor([0, 5]), 5)
    with pytest.raises(RuntimeError, match=r"unpad_mask: expected a \(batch, seq_len\) mask"):
        _cpp.unpad_mask(torch.ones(3))


# --- linear: the row-split half-precision GEMM ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 37, 300, 524, 1031])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(dtype, rows, with_bias):
    """Rows split across threads (half precision, >= 128 rows per thread) or at::linear: same math."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 96), torch.randn(80, 96) * 0.1
    b = torch.randn(80) if with_bias else None
    ref32 = torch.nn.functional.linear(x, w, b)
    xs, ws, bs = x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
    same = torch.nn.functional.linear(xs, ws, bs)
    for threads in (1, 2, 3):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ours = _cpp.linear(xs, ws, bs)
            with torch.inference_mode():
                ours_inf = _cpp.linear(xs, ws, bs)
        finally:
            torch.set_num_threads(prev)
        assert ours.shape == (rows, 80) and ours.dtype == dtype
        assert torch.equal(ours, ours_inf)
        if dtype == torch.float32:
            assert_close_fp32(ours, ref32, 1e-4, "linear fp32")
        else:
            assert_half_rule(ours, same, ref32, HALF_OP_FACTOR, f"linear {dtype} threads={threads}")


def test_linear_3d_input_and_errors():
    x, w = torch.randn(2, 300, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert _cpp.linear(x, w).shape == (2, 300, 32)
    with pytest.raises(RuntimeError, match="x has 63 features in its last dim, weight expects 64"):
        _cpp.linear(torch.randn(4, 63), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x is BFloat16, weight is Float"):
        _cpp.linear(torch.randn(4, 64).bfloat16(), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8\)"):
        _cpp.linear(torch.randn(4, 64), torch.randn(8, 64), torch.randn(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 256, 257])
def test_public_linear_prepacked_small_batches(dtype, rows):
    """kernels.linear on the cpp backend: prepacked oneDNN weights up to PACKED_MAX_ROWS rows."""
    import importlib

    linear_mod = importlib.import_module("bert_fast.kernels.linear")

    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 64), torch.randn(48, 64) * 0.1, torch.randn(48)
    ref32 = torch.nn.functional.linear(x, w, b)
    xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
    calls = []

    def pack():
        calls.append(1)
        return K.prepack_weight(ws)

    with torch.inference_mode():
        ours = K.linear(xs, ws, bs, backend="cpp", packed=pack)
    assert bool(calls) == (rows <= linear_mod.PACKED_MAX_ROWS)
    if dtype == torch.float32:
        assert_close_fp32(ours, ref32, 1e-4, "prepacked linear fp32")
    else:
        assert_half_rule(ours, torch.nn.functional.linear(xs, ws, bs), ref32, HALF_OP_FACTOR, "prepacked bf16")
