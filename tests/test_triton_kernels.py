"""The Triton kernels against their ``_ref`` oracles.

Without CUDA these run under the Triton interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), so shapes stay small and odd: hidden 37/312/384, sequence lengths 1, 7,
33, 37 and 0 in one packed batch, head_dim 26/32/64. With CUDA the same tests run the compiled
kernels on the GPU.

Every output is *poisoned*: PyTorch's ``fill_uninitialized_memory`` (with deterministic mode on)
fills each ``torch.empty`` with NaN, so an element a kernel fails to write is NaN and fails the
comparison (the interpreter raises nothing on out-of-bounds accesses).

fp32: max abs diff against the fp32 reference (``tolerances.py``). fp16: the half rule — our
error against the fp32 reference at most twice PyTorch's own fp16 error plus a floor. bf16 is
tested on the GPU only (``test_triton_gpu.py``): the interpreter's bf16 dot and stores are not
faithful.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import bert_fast.kernels as K
import pytest
import torch
from bert_fast.kernels import _backend
from bert_fast.kernels import attention as attention_mod
from bert_fast.kernels.activation import bias_act_fwd
from bert_fast.kernels.attention import varlen_attention_fwd
from bert_fast.kernels.embeddings import embed_layer_norm_fwd
from bert_fast.kernels.layer_norm import bias_residual_layer_norm_fwd
from tolerances import FP32_ATTN_ATOL, FP32_OP_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

if not _backend.triton_importable():
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _backend.interpreter_enabled():
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

SEQ_LENS = (1, 7, 0, 33, 37)


@pytest.fixture(autouse=True)
def poison_outputs():
    """NaN-fill every uninitialized tensor, so unwritten output elements fail the comparison."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    probe = torch.empty(8, device=DEVICE)
    assert torch.isnan(probe).all(), "poisoning is not active: an unwritten element could pass"
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _check(ours: torch.Tensor, ref32: torch.Tensor, torch_same: torch.Tensor, atol: float, what: str) -> None:
    assert ours.dtype == torch_same.dtype, f"{what}: dtype {ours.dtype} != {torch_same.dtype}"
    if ours.dtype == torch.float32:
        assert_close_fp32(ours, ref32, atol, what)
    else:
        assert ours.shape == ref32.shape, what
        assert_half_rule(ours, torch_same, ref32, HALF_OP_FACTOR, what)


def _f32(*ts):
    return [t.float() if t is not None and t.is_floating_point() else t for t in ts]


# ----------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, 312, 384])
@pytest.mark.parametrize(
    "has_bias,has_residual,eps", [(True, True, 1e-12), (False, False, 1e-5), (True, False, 1e-12), (False, True, 1e-5)]
)
def test_layer_norm(dtype, hidden, has_bias, has_residual, eps):
    x = (torch.randn(3, 7, hidden, device=DEVICE) * 2 + 0.5).to(dtype)  # leading dims are flattened
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    b = torch.randn(hidden, device=DEVICE).to(dtype)
    lb = torch.randn(hidden, device=DEVICE).to(dtype) if has_bias else None
    res = torch.randn(3, 7, hidden, device=DEVICE).to(dtype) if has_residual else None
    ours = bias_residual_layer_norm_fwd(x, w, b, eps, lb, res)
    ref32 = K.bias_residual_layer_norm_ref(*_f32(x, w, b), eps, *_f32(lb, res))
    same = K.bias_residual_layer_norm_ref(x, w, b, eps, lb, res)
    _check(ours, ref32, same, FP32_OP_ATOL, f"layer_norm {dtype} H={hidden}")


def test_layer_norm_constant_row_tiny_eps():
    """Zero variance with eps=1e-12: rstd ~1e6, so the mean must be exact (output = bias)."""
    x = torch.randn(4, 312, device=DEVICE)
    x[1] = 3.7
    x[2] = -1e-3
    w, b = torch.randn(312, device=DEVICE), torch.randn(312, device=DEVICE)
    ours = bias_residual_layer_norm_fwd(x, w, b, 1e-12)
    assert_close_fp32(ours, K.bias_residual_layer_norm_ref(x, w, b, 1e-12), FP32_OP_ATOL, "constant rows")
    assert torch.equal(ours[1], b) and torch.equal(ours[2], b)


# ----------------------------------------------------------------------------- bias + activation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_act(dtype, activation, has_bias):
    # 148 columns = 37 * 4 (two column tiles under the interpreter, the second partly masked);
    # 33 * 3 rows (a partial row tile). Large values reach the saturated tails of both GELUs.
    x = (torch.randn(33, 3, 148, device=DEVICE) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([30.0, -30.0, 0.0, -12.0])
    bias = torch.randn(148, device=DEVICE).to(dtype) if has_bias else None
    ours = bias_act_fwd(x, bias, activation)
    ref32 = K.bias_act_ref(*_f32(x, bias), activation)
    same = K.bias_act_ref(x, bias, activation)
    _check(ours, ref32, same, FP32_OP_ATOL, f"bias_act {activation} {dtype}")


def test_bias_act_strided_rows():
    """A column slice (row stride != width) is read through its stride."""
    base = torch.randn(19, 400, device=DEVICE)
    x = base[:, 10:322]
    bias = torch.randn(312, device=DEVICE)
    assert_close_fp32(bias_act_fwd(x, bias, "gelu"), K.bias_act_ref(x, bias, "gelu"), FP32_OP_ATOL, "strided")


# ----------------------------------------------------------------------------- embeddings + LayerNorm
def _tables(hidden: int, dtype: torch.dtype, vocab: int = 101, max_pos: int = 64, types: int = 2):
    t = [torch.randn(n, hidden, device=DEVICE).to(dtype) for n in (vocab, max_pos, types)]
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    b = torch.randn(hidden, device=DEVICE).to(dtype)
    return (*t, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, 312, 384])
@pytest.mark.parametrize(
    "token_types,embeds,eps", [(True, False, 1e-12), (False, False, 1e-5), (True, True, 1e-5), (False, True, 1e-12)]
)
def test_embed_layer_norm(dtype, hidden, token_types, embeds, eps):
    word, pos, typ, w, b = _tables(hidden, dtype)
    lens = (1, 7, 0, 5)  # packed tokens of four sequences, one of them empty
    n = sum(lens)
    input_ids = torch.randint(0, word.shape[0], (n,), device=DEVICE)  # int64 ids
    position_ids = torch.cat([torch.arange(length, device=DEVICE) for length in lens])
    tt_ids = torch.randint(0, 2, (n,), device=DEVICE, dtype=torch.int32) if token_types else None  # int32 ids
    inputs_embeds = torch.randn(n, hidden, device=DEVICE).to(dtype) if embeds else None
    ids = None if embeds else input_ids
    ours = embed_layer_norm_fwd(ids, position_ids, tt_ids, word, pos, typ, w, b, eps, inputs_embeds)
    ref32 = K.embed_layer_norm_ref(ids, position_ids, tt_ids, *_f32(word, pos, typ, w, b), eps, *_f32(inputs_embeds))
    same = K.embed_layer_norm_ref(ids, position_ids, tt_ids, word, pos, typ, w, b, eps, inputs_embeds)
    _check(ours, ref32, same, FP32_OP_ATOL, f"embed_layer_norm {dtype} H={hidden}")


def test_embed_layer_norm_constant_row_tiny_eps():
    word, pos, typ, w, b = _tables(384, torch.float32)
    pos[0] = 0.0
    typ[0] = 0.0
    word[5] = 0.25  # word 5 + type 0 + position 0 is a constant row: output = bias exactly
    ids = torch.tensor([5, 7], device=DEVICE)
    out = embed_layer_norm_fwd(ids, torch.tensor([0, 3], device=DEVICE), None, word, pos, typ, w, b, 1e-12)
    ref = K.embed_layer_norm_ref(ids, torch.tensor([0, 3], device=DEVICE), None, word, pos, typ, w, b, 1e-12)
    assert_close_fp32(out, ref, FP32_OP_ATOL, "constant row")
    assert torch.equal(out[0], b)


# ----------------------------------------------------------------------------- varlen attention
def _packed_qkv(lens, heads, head_dim, dtype):
    """q, k, v as strided views into one fused (N, 3 * hidden) projection output, as the model has them."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    n = int(cu[-1])
    qkv = torch.randn(n, 3 * heads * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)
    return q, k, v, cu, max(lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [26, 32, 64])
def test_varlen_attention(dtype, head_dim):
    heads = 2
    q, k, v, cu, max_len = _packed_qkv(SEQ_LENS, heads, head_dim, dtype)
    assert not q.is_contiguous() and q.stride(0) == 3 * heads * head_dim  # no copy was made for the test
    scale = 1.0 / math.sqrt(head_dim) if head_dim != 32 else 0.3  # one non-default scale
    ours = varlen_attention_fwd(q, k, v, cu, max_len, scale)
    assert ours.shape == q.shape and ours.is_contiguous()
    ref32 = K.varlen_attention_ref(*_f32(q, k, v), cu, max_len, scale)
    same = K.varlen_attention_ref(q, k, v, cu, max_len, scale)
    _check(ours, ref32, same, FP32_ATTN_ATOL, f"attention {dtype} d={head_dim}")


def test_varlen_attention_edge_batches():
    """Only empty sequences; a single length-1 sequence (softmax over one key = v itself)."""
    q, k, v, cu, _ = _packed_qkv((0, 0), 2, 32, torch.float32)
    assert varlen_attention_fwd(q, k, v, cu, 0).shape == (0, 2, 32)
    q, k, v, cu, max_len = _packed_qkv((1,), 2, 32, torch.float32)
    ours = varlen_attention_fwd(q, k, v, cu, max_len)
    assert_close_fp32(ours, v.contiguous(), FP32_OP_ATOL, "length 1")


def test_varlen_attention_chunked_launch(monkeypatch):
    """More (batch * heads) than one grid dimension holds: launched in chunks of sequences."""
    monkeypatch.setattr(attention_mod, "_MAX_GRID_Y", 4)  # 2 heads -> 2 sequences per launch
    q, k, v, cu, max_len = _packed_qkv((5, 0, 17, 1, 9), 2, 32, torch.float32)
    ours = varlen_attention_fwd(q, k, v, cu, max_len)
    assert_close_fp32(ours, K.varlen_attention_ref(q, k, v, cu, max_len), FP32_ATTN_ATOL, "chunked")


# ----------------------------------------------------------------------------- public functions
def test_public_functions_backend_triton():
    hidden, heads = 64, 2
    x = torch.randn(11, hidden, device=DEVICE)
    w, b, lb, res = (torch.randn(hidden, device=DEVICE) for _ in range(4))
    res = torch.randn(11, hidden, device=DEVICE)
    out = K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb, residual=res, backend="triton")
    ref = K.bias_residual_layer_norm_ref(x, w, b, 1e-12, lb, res)
    assert_close_fp32(out, ref, FP32_OP_ATOL, "bias_residual_layer_norm")

    y = torch.randn(11, 4 * hidden, device=DEVICE)
    bias = torch.randn(4 * hidden, device=DEVICE)
    assert_close_fp32(K.bias_act(y, bias, "gelu", backend="triton"), K.bias_act_ref(y, bias, "gelu"), FP32_OP_ATOL, "")

    word, pos, typ, w2, b2 = _tables(hidden, torch.float32)
    ids, pids = torch.randint(0, 101, (11,), device=DEVICE), torch.arange(11, device=DEVICE)
    out = K.embed_layer_norm(ids, pids, None, word, pos, typ, w2, b2, 1e-12, backend="triton")
    ref = K.embed_layer_norm_ref(ids, pids, None, word, pos, typ, w2, b2, 1e-12)
    assert_close_fp32(out, ref, FP32_OP_ATOL, "embed_layer_norm")

    q, k, v, cu, max_len = _packed_qkv((3, 8), heads, 32, torch.float32)
    with K.use_backend("triton"):  # the context manager route too
        out = K.varlen_attention(q, k, v, cu, max_len)
    assert_close_fp32(out, K.varlen_attention_ref(q, k, v, cu, max_len), FP32_ATTN_ATOL, "varlen_attention")


def test_unsupported_calls_raise_or_fall_back():
    q, k, v, cu, max_len = _packed_qkv((3, 5), 1, 256, torch.float32)  # head_dim 256 > 128
    with pytest.raises(K.BackendUnavailableError, match="head_dim 256"):
        K.varlen_attention(q, k, v, cu, max_len, backend="triton")
    out = K.varlen_attention(q, k, v, cu, max_len, backend="auto")
    assert_close_fp32(out, K.varlen_attention_ref(q, k, v, cu, max_len), FP32_ATTN_ATOL, "fallback")

    x = torch.randn(2, 5000, device=DEVICE)  # hidden > 4096
    w, b = torch.ones(5000, device=DEVICE), torch.zeros(5000, device=DEVICE)
    with pytest.raises(K.BackendUnavailableError, match="hidden size 5000"):
        K.bias_residual_layer_norm(x, w, b, 1e-12, backend="triton")
    ref = K.bias_residual_layer_norm_ref(x, w, b, 1e-12)
    assert_close_fp32(K.bias_residual_layer_norm(x, w, b, 1e-12), ref, FP32_OP_ATOL, "fallback")

    x64 = torch.randn(3, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(K.BackendUnavailableError, match="float64"):
        K.bias_act(x64, None, "relu", backend="triton")
    with pytest.raises(K.BackendUnavailableError, match="dropout"):
        K.varlen_attention(q[..., :32], k[..., :32], v[..., :32], cu, max_len, dropout_p=0.1, backend="triton")


def test_gradients_through_triton_backend_equal_reference():
    """Forward on the Triton kernel, backward = the reference's gradient (kernels/_autograd.py)."""
    h = 37

    def leaves(*shapes):
        return [torch.randn(*s, device=DEVICE, requires_grad=True) for s in shapes]

    def grads_of(fn, ts):
        out = fn(*ts)
        g = torch.randn_like(out)
        return out, torch.autograd.grad(out, ts, g)

    ln_in = leaves((5, h), (h,), (h,), (h,), (5, h))

    def ln(x, w, b, lb, r, backend):
        return K.bias_residual_layer_norm(x, w, b, 1e-12, linear_bias=lb, residual=r, backend=backend)

    act_in = leaves((5, 4 * h), (4 * h,))
    q, k, v, cu, max_len = _packed_qkv((3, 0, 6), 2, 26, torch.float32)
    att_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    word, pos, typ, w, b = (t.requires_grad_(True) for t in _tables(h, torch.float32))
    ids, pids = torch.randint(0, 101, (6,), device=DEVICE), torch.arange(6, device=DEVICE)
    cases = [
        ("layer_norm", ln_in, lambda *t: ln(*t[:5], t[5])),
        ("bias_act", act_in, lambda x, bias, be: K.bias_act(x, bias, "gelu_tanh", backend=be)),
        ("attention", att_in, lambda q, k, v, be: K.varlen_attention(q, k, v, cu, max_len, backend=be)),
        (
            "embeddings",
            [word, pos, typ, w, b],
            lambda we, pe, te, w_, b_, be: K.embed_layer_norm(ids, pids, None, we, pe, te, w_, b_, 1e-12, backend=be),
        ),
    ]
    for name, ts, fn in cases:
        torch.manual_seed(1)
        out_t, g_t = grads_of(lambda *a, fn=fn: fn(*a, "triton"), ts)
        torch.manual_seed(1)
        out_r, g_r = grads_of(lambda *a, fn=fn: fn(*a, "torch"), ts)
        atol = FP32_ATTN_ATOL if name == "attention" else FP32_OP_ATOL
        assert_close_fp32(out_t, out_r, atol, f"{name} forward")
        for i, (gt, gr) in enumerate(zip(g_t, g_r)):
            assert torch.allclose(gt, gr, rtol=0, atol=1e-6), f"{name}: gradient {i} differs"


# ----------------------------------------------------------------------------- torch.compile
def _compile_check() -> None:
    """The launchers trace as custom ops (fake impls give the shapes); fullgraph=True fails on a break."""
    hidden, heads = 64, 2
    q, k, v, cu, max_len = _packed_qkv((3, 8), heads, hidden // heads, torch.float32)
    w, b, lb = (torch.randn(hidden, device=DEVICE) for _ in range(3))
    bias = torch.randn(4 * hidden, device=DEVICE)
    word, pos, typ, ew, eb = _tables(hidden, torch.float32)
    ids, pids = torch.randint(0, 101, (11,), device=DEVICE), torch.cat([torch.arange(3), torch.arange(8)]).to(DEVICE)

    def block(ids, pids):
        x = embed_layer_norm_fwd(ids, pids, None, word, pos, typ, ew, eb, 1e-12)
        a = varlen_attention_fwd(q, k, v, cu, max_len).reshape(-1, hidden)
        h = bias_residual_layer_norm_fwd(a, w, b, 1e-12, lb, x)
        return bias_act_fwd(h.repeat(1, 4), bias, "gelu")

    expected = block(ids, pids)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_close_fp32(compiled(ids, pids), expected, 1e-6, "compiled")


def test_launchers_compile_without_graph_breaks():
    """Runs :func:`_compile_check` in a fresh interpreter.

    In two of four full-suite runs (never alone) Dynamo's fake-tensor propagation of the first
    custom op failed with a C++ allocation error (std::bad_alloc, vector::reserve) that depended on
    what earlier tests had left in the process; the cause is not found yet (the C++ extension's op
    tests are clean under AddressSanitizer). A fresh process keeps this check meaningful and
    deterministic.
    """
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_triton_kernels as t"
    code += "; t._compile_check(); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- import-time rules
_IMPORT_PROBE = """
import sys
{block}
import torch
import bert_fast.kernels as K
from bert_fast.kernels import activation, attention, embeddings, layer_norm
{check}
"""


def _run_probe(block: str, check: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled-kernel mode
    code = _IMPORT_PROBE.format(block=block, check=check)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_touches_no_triton_driver():
    """Importing the op modules builds no driver (no GPU query) and no autotuner."""
    _run_probe(
        "",
        "d = sys.modules['triton.runtime.driver'].driver\n"
        "assert d._active is None and getattr(d, '_default', None) is None, 'driver touched'\n"
        "from bert_fast.kernels import _triton_utils as tu\n"
        "assert tu.autotuned.cache_info().currsize == 0\n",
    )


def test_modules_import_and_fall_back_without_triton():
    _run_probe(
        "sys.modules['triton'] = None  # import triton now raises ImportError",
        "x = torch.randn(4, 8)\n"
        "assert torch.equal(K.bias_act(x, None, 'relu'), K.bias_act_ref(x, None, 'relu'))\n"
        "assert 'triton is not importable' in activation._triton_support(x, None)\n"
        "try:\n"
        "    K.bias_act(x, None, 'relu', backend='triton')\n"
        "    raise SystemExit('no error under an explicit triton backend')\n"
        "except K.BackendUnavailableError:\n"
        "    pass\n",
    )
