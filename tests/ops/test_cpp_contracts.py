"""The validators of the C++ extension (csrc/contracts.h): each op rejects a bad dtype, a tensor on
another device, a bad shape, a bad stride and out-of-range ids/indices with a RuntimeError that
names the op and the argument.

The validators are shared by the CPU kernels and the CUDA glue, so checking them through the CPU
kernels checks the contract of both. Device mixing cannot reach the CPU kernel through normal
dispatch on a CPU-only machine (a meta argument sends the call to the meta kernel), so those cases
call the CPU kernel directly (``OpOverload.redispatch`` with the CPU dispatch key): the validator
must refuse the meta tensor before any data is read.
"""

from __future__ import annotations

import importlib

import pytest
import torch

try:
    importlib.import_module("bert_fast._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"bert_fast._C is not built: {exc}", allow_module_level=True)

OPS = torch.ops.bert_fast
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
META = torch.device("meta")


def cpu_kernel(name: str, *args):
    """Run the op's CPU kernel whatever the devices of its arguments."""
    return getattr(OPS, name).default.redispatch(CPU_KEYS, *args)


def raises(pattern: str):
    return pytest.raises(RuntimeError, match=pattern)


# --- bias_residual_layer_norm ----------------------------------------------------------------------


def test_bias_residual_layer_norm_contract():
    op = OPS.bias_residual_layer_norm
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with raises(r"bias_residual_layer_norm: x must be float32, bfloat16 or float16, got Int"):
        op(x.int(), w, b, 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: bias must have shape \(8,\), got \[7\]"):
        op(x, w, b[:7], 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: linear_bias must have shape \(8,\), got \[2, 4\]"):
        op(x, w, b, 1e-5, b.view(2, 4), None)
    with raises(r"bias_residual_layer_norm: weight must be a floating-point tensor, got Long"):
        op(x, w.long(), b, 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: residual shape \[4, 4\] != x shape \[4, 8\]"):
        op(x, w, b, 1e-5, None, x[:, :4])
    with raises(r"bias_residual_layer_norm: x must be contiguous in its last dimension .* got stride 4"):
        op(torch.randn(8, 4).t(), w, b, 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: residual must be contiguous in its last dimension"):
        op(x, w, b, 1e-5, None, torch.randn(8, 4).t())
    with raises(r"bias_residual_layer_norm: the normalized \(last\) dimension of x must be non-empty"):
        op(torch.randn(4, 0), w[:0], b[:0], 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: weight is on meta, expected cpu \(the device of x\)"):
        cpu_kernel("bias_residual_layer_norm", x, w.to(META), b, 1e-5, None, None)
    with raises(r"bias_residual_layer_norm: residual is on meta, expected cpu"):
        cpu_kernel("bias_residual_layer_norm", x, w, b, 1e-5, None, x.to(META))
    with raises(r"bias_residual_layer_norm: linear_bias is on meta, expected cpu"):
        cpu_kernel("bias_residual_layer_norm", x, w, b, 1e-5, b.to(META), None)


# --- bias_act --------------------------------------------------------------------------------------


def test_bias_act_contract():
    op = OPS.bias_act
    x, b = torch.randn(4, 8), torch.randn(8)
    with raises(r"bias_act: unknown activation 'silu'; expected gelu, gelu_tanh or relu"):
        op(x, b, "silu")
    with raises(r"bias_act: x must be float32, bfloat16 or float16, got Double"):
        op(x.double(), b, "gelu")
    with raises(r"bias_act: bias must have shape \(8,\), got \[9\]"):
        op(x, torch.randn(9), "relu")
    with raises(r"bias_act: bias must be a floating-point tensor, got Int"):
        op(x, b.int(), "relu")
    with raises(r"bias_act: x must be contiguous in its last dimension"):
        op(torch.randn(8, 4).t(), b[:4], "gelu")
    with raises(r"bias_act: bias is on meta, expected cpu \(the device of x\)"):
        cpu_kernel("bias_act", x, b.to(META), "gelu_tanh")


# --- embed_layer_norm ------------------------------------------------------------------------------


def _embed_kwargs(**over) -> dict:
    args = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "position_ids": torch.tensor([[0, 1, 2]]),
        "token_type_ids": torch.tensor([[0, 1, 0]]),
        "word_emb": torch.randn(10, 8),
        "pos_emb": torch.randn(4, 8),
        "type_emb": torch.randn(2, 8),
        "weight": torch.randn(8),
        "bias": torch.randn(8),
        "eps": 1e-12,
        "inputs_embeds": None,
    }
    args.update(over)
    return args


def _embed_args(**over) -> tuple:
    return tuple(_embed_kwargs(**over).values())


def test_embed_layer_norm_contract():
    op = OPS.embed_layer_norm
    assert op(*_embed_args()).shape == (1, 3, 8)
    with raises(r"embed_layer_norm: give input_ids or inputs_embeds"):
        op(*_embed_args(input_ids=None))
    with raises(r"embed_layer_norm: word_emb must be float32, bfloat16 or float16, got Long"):
        op(*_embed_args(word_emb=torch.ones(10, 8, dtype=torch.long)))
    with raises(r"embed_layer_norm: word_emb must be 2-D \(vocab, hidden\), got shape \[80\]"):
        op(*_embed_args(word_emb=torch.randn(80)))
    with raises(r"embed_layer_norm: pos_emb must have shape \(rows, 8\), got \[4, 6\]"):
        op(*_embed_args(pos_emb=torch.randn(4, 6)))
    with raises(r"embed_layer_norm: type_emb dtype BFloat16 != word embeddings dtype Float"):
        op(*_embed_args(type_emb=torch.randn(2, 8).bfloat16()))
    with raises(r"embed_layer_norm: pos_emb must be contiguous in its last dimension"):
        op(*_embed_args(pos_emb=torch.randn(8, 4).t()))
    with raises(r"embed_layer_norm: type_emb needs at least one row"):
        op(*_embed_args(type_emb=torch.randn(0, 8), token_type_ids=None))
    with raises(r"embed_layer_norm: weight must have shape \(8,\), got \[7\]"):
        op(*_embed_args(weight=torch.randn(7)))
    with raises(r"embed_layer_norm: input_ids must be int64 or int32, got Float"):
        op(*_embed_args(input_ids=torch.tensor([[1.0, 2.0, 3.0]])))
    with raises(r"embed_layer_norm: token_type_ids shape \[1, 2\] != position_ids shape \[1, 3\]"):
        op(*_embed_args(token_type_ids=torch.tensor([[0, 1]])))
    with raises(r"embed_layer_norm: inputs_embeds shape \[1, 3, 7\] != \[1, 3, 8\]"):
        op(*_embed_args(inputs_embeds=torch.randn(1, 3, 7)))
    with raises(r"embed_layer_norm: inputs_embeds dtype Half != embeddings dtype Float"):
        op(*_embed_args(inputs_embeds=torch.randn(1, 3, 8).half()))


@pytest.mark.parametrize(
    "name,value,rows",
    [("input_ids", 10, 10), ("input_ids", -1, 10), ("token_type_ids", 2, 2), ("position_ids", 4, 4)],
)
def test_embed_layer_norm_id_ranges(name, value, rows):
    ids = {"input_ids": [1, 2, 3], "token_type_ids": [0, 1, 0], "position_ids": [0, 1, 2]}[name]
    bad = torch.tensor([[ids[0], value, ids[2]]])
    with raises(rf"embed_layer_norm: {name} value {value} is out of range \[0, {rows}\)"):
        OPS.embed_layer_norm(*_embed_args(**{name: bad}))


def test_embed_layer_norm_ignores_input_ids_with_inputs_embeds():
    """With inputs_embeds the ids are not read, so not checked (the documented contract)."""
    out = OPS.embed_layer_norm(*_embed_args(input_ids=torch.tensor([[99, 99, 99]]), inputs_embeds=torch.randn(1, 3, 8)))
    assert out.shape == (1, 3, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["position_ids", "input_ids", "token_type_ids", "pos_emb", "weight", "inputs_embeds"])
def test_embed_layer_norm_devices(name):
    default = _embed_kwargs()[name]
    over = {name: torch.empty(1, 3, 8, device=META) if default is None else default.to(META)}
    with raises(rf"embed_layer_norm: {name} is on meta, expected cpu \(the device of word_emb\)"):
        cpu_kernel("embed_layer_norm", *_embed_args(**over))


# --- varlen_attention ------------------------------------------------------------------------------


def _qkv(tokens=7, heads=2, d=8, dtype=torch.float32):
    return [torch.randn(tokens, heads, d, dtype=dtype) for _ in range(3)]


def test_varlen_attention_contract():
    op = OPS.varlen_attention
    q, k, v = _qkv()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert op(q, k, v, cu, 4, 0.5).shape == q.shape
    with raises(r"varlen_attention: q must be float32, bfloat16 or float16, got Double"):
        op(q.double(), k, v, cu, 4, 0.5)
    with raises(r"varlen_attention: v dtype Half != q dtype Float"):
        op(q, k, v.half(), cu, 4, 0.5)
    with raises(r"varlen_attention: q must be \(tokens, heads, head_dim\), got shape \[7, 16\]"):
        op(q.flatten(1), k, v, cu, 4, 0.5)
    with raises(r"varlen_attention: k shape \[7, 2, 4\] != q shape \[7, 2, 8\]"):
        op(q, k[..., :4], v, cu, 4, 0.5)
    with raises(r"varlen_attention: k must be contiguous in its last dimension"):
        op(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, cu, 4, 0.5)
    with raises(r"varlen_attention: cu_seqlens must be a 1-D tensor of batch \+ 1 offsets"):
        op(q, k, v, cu.view(1, 3), 4, 0.5)
    with raises(r"varlen_attention: cu_seqlens must be int64 or int32, got Float"):
        op(q, k, v, cu.float(), 4, 0.5)
    with raises(r"varlen_attention: scale must be finite, got inf"):
        op(q, k, v, cu, 4, float("inf"))
    with raises(r"varlen_attention: cu_seqlens\[0\] must be 0, got 1"):
        op(q, k, v, torch.tensor([1, 3, 7]), 4, 0.5)
    with raises(r"varlen_attention: cu_seqlens must be non-decreasing, got 5 then 3"):
        op(q, k, v, torch.tensor([0, 5, 3, 7]), 5, 0.5)
    with raises(r"varlen_attention: sequence 1 has length 4 > max_seqlen 3"):
        op(q, k, v, cu, 3, 0.5)
    with raises(r"varlen_attention: v is on meta, expected cpu \(the device of q\)"):
        cpu_kernel("varlen_attention", q, k, v.to(META), cu, 4, 0.5)
    with raises(r"varlen_attention: cu_seqlens is on meta, expected cpu \(the device of q\)"):
        cpu_kernel("varlen_attention", q, k, v, cu.to(META), 4, 0.5)


# --- padding ops -----------------------------------------------------------------------------------


def test_padding_contracts():
    x = torch.randn(4, 3)
    with raises(r"unpad_mask: expected a \(batch, seq_len\) mask, got shape \[2, 2, 2\]"):
        OPS.unpad_mask(torch.ones(2, 2, 2))
    with raises(r"gather_rows: x must have a row dimension, got a 0-d tensor"):
        OPS.gather_rows(torch.tensor(1.0), torch.tensor([0]))
    with raises(r"gather_rows: indices must be int64 or int32, got Float"):
        OPS.gather_rows(x, torch.tensor([0.0]))
    with raises(r"gather_rows: indices must be 1-D, got shape \[1, 2\]"):
        OPS.gather_rows(x, torch.tensor([[0, 1]]))
    with raises(r"gather_rows: index -1 is out of range \[0, 4\)"):
        OPS.gather_rows(x, torch.tensor([0, -1]))
    with raises(r"gather_rows: indices is on meta, expected cpu \(the device of x\)"):
        cpu_kernel("gather_rows", x, torch.tensor([0]).to(META))
    with raises(r"scatter_rows: num_rows must be >= 0, got -1"):
        OPS.scatter_rows(x, torch.arange(4), -1)
    with raises(r"scatter_rows: indices has 3 entries but x has 4 rows"):
        OPS.scatter_rows(x, torch.arange(3), 8)
    with raises(r"scatter_rows: index 8 is out of range \[0, 8\)"):
        OPS.scatter_rows(x, torch.tensor([0, 1, 2, 8]), 8)
    with raises(r"scatter_rows: indices must be int64 or int32, got Bool"):
        OPS.scatter_rows(x, torch.ones(4, dtype=torch.bool), 8)
    with raises(r"scatter_rows: indices is on meta, expected cpu"):
        cpu_kernel("scatter_rows", x, torch.arange(4).to(META), 8)


# --- linear ----------------------------------------------------------------------------------------


def test_linear_contract():
    op = OPS.linear
    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    torch.testing.assert_close(op(x, w, b), torch.nn.functional.linear(x, w, b))
    with raises(r"linear: weight must be 2-D \(out_features, in_features\), got 1-D"):
        op(x, w[0], None)
    with raises(r"linear: x has 6 features in its last dim, weight expects 5"):
        op(x, w[:, :5], None)
    with raises(r"linear: x is Float, weight is BFloat16"):
        op(x, w.bfloat16(), None)
    with raises(r"linear: x must be a floating-point tensor, got Long"):
        op(x.long(), w.long(), None)
    with raises(r"linear: bias must have shape \(5\), got \[6\]"):
        op(x, w, torch.randn(6))
    with raises(r"linear: bias is BFloat16, x is Float"):
        op(x, w, b.bfloat16())
    with raises(r"linear: weight is on meta, expected cpu \(the device of x\)"):
        cpu_kernel("linear", x, w.to(META), None)
    with raises(r"linear: bias is on meta, expected cpu \(the device of x\)"):
        cpu_kernel("linear", x, w, b.to(META))


# --- the CUDA implementations (gpu tier): same contract, same results --------------------------------

_WITH_CUDA = bool(getattr(importlib.import_module("bert_fast._C"), "WITH_CUDA", False))
HALF = (torch.bfloat16, torch.float16)


def cuda_test(fn):
    fn = pytest.mark.skipif(not _WITH_CUDA, reason="bert_fast._C was built without its CUDA kernels")(fn)
    return pytest.mark.gpu(fn)


def _check(ours, ref_fn, args, dtype, what, atol=1e-5):
    """fp32: max abs diff <= atol; half: the tolerance rule of tests/tolerances.py against fp32."""
    from tolerances import HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

    f32 = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    if dtype == torch.float32:
        assert_close_fp32(ours, ref_fn(*f32), atol, what)
    else:
        assert_half_rule(ours, ref_fn(*args), ref_fn(*f32), HALF_OP_FACTOR, what)


@cuda_test
@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("hidden", (312, 768, 1024))
def test_cuda_row_ops_match_reference(dtype, hidden):
    dev = "cuda"
    x = torch.randn(1031, hidden, device=dev, dtype=dtype) * 2 + 0.5
    res = torch.randn_like(x)
    w, b, lb = (torch.randn(hidden, device=dev, dtype=dtype) for _ in range(3))

    def ln_ref(x, w, b, lb, res):
        return torch.nn.functional.layer_norm((x + lb) + res, (x.shape[-1],), w, b, 1e-12)

    ours = OPS.bias_residual_layer_norm(x, w, b, 1e-12, lb, res)
    _check(ours, ln_ref, (x, w, b, lb, res), dtype, f"bias_residual_layer_norm {dtype} H={hidden}")
    for act, ref in (
        ("gelu", lambda x, b: torch.nn.functional.gelu(x + b)),
        ("gelu_tanh", lambda x, b: torch.nn.functional.gelu(x + b, approximate="tanh")),
        ("relu", lambda x, b: torch.relu(x + b)),
    ):
        _check(OPS.bias_act(x, lb, act), ref, (x, lb), dtype, f"bias_act {act} {dtype} H={hidden}")
    word, pos, typ = (torch.randn(n, hidden, device=dev, dtype=dtype) for n in (1000, 512, 2))
    ids = torch.randint(0, 1000, (8, 128), device=dev)
    pids = torch.arange(128, device=dev).expand(8, 128)
    tts = torch.randint(0, 2, (8, 128), device=dev, dtype=torch.int32)

    def emb_ref(word, pos, typ, w, b):
        return torch.nn.functional.layer_norm((word[ids] + typ[tts.long()]) + pos[pids], (hidden,), w, b, 1e-12)

    ours = OPS.embed_layer_norm(ids, pids, tts, word, pos, typ, w, b, 1e-12, None)
    _check(ours, emb_ref, (word, pos, typ, w, b), dtype, f"embed_layer_norm {dtype} H={hidden}")


@cuda_test
def test_cuda_padding_ops_match_cpu():
    mask = torch.rand(8, 128) > 0.3
    mask[3] = False  # a row of padding only
    mask[5, 0] = True
    idx_c, cu_c, mx_c = OPS.unpad_mask(mask)
    idx_g, cu_g, mx_g = OPS.unpad_mask(mask.cuda())
    assert torch.equal(idx_g.cpu(), idx_c) and torch.equal(cu_g.cpu(), cu_c) and int(mx_g) == int(mx_c)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = torch.randn(8 * 128, 36).to(dtype)  # 72-byte rows (bf16): the 4-byte-word copy path
        packed = OPS.gather_rows(x.cuda(), idx_g)
        assert torch.equal(packed.cpu(), OPS.gather_rows(x, idx_c))
        assert torch.equal(OPS.scatter_rows(packed, idx_g, 8 * 128).cpu(), OPS.scatter_rows(packed.cpu(), idx_c, 1024))


@cuda_test
@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("head_dim", (26, 32, 64, 128))
def test_cuda_varlen_attention_matches_reference(dtype, head_dim):
    lens = [1, 7, 128, 33, 0, 77]
    heads, n = 4, sum(lens)
    qkv = torch.randn(n, 3, heads, head_dim, device="cuda", dtype=dtype)  # strided views, as from a fused QKV
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    scale = head_dim**-0.5

    def ref(q, k, v):
        out = torch.zeros_like(q)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            if e > s:
                att = torch.softmax((q[s:e].transpose(0, 1) @ k[s:e].transpose(0, 1).transpose(1, 2)) * scale, -1)
                out[s:e] = (att @ v[s:e].transpose(0, 1)).transpose(0, 1)
        return out

    ours = OPS.varlen_attention(q, k, v, cu, max(lens), scale)
    assert ours.shape == q.shape and ours.dtype == dtype
    _check(ours, ref, (q, k, v), dtype, f"varlen_attention {dtype} d={head_dim}", atol=1e-4)


@cuda_test
@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
def test_cuda_linear_matches_f_linear(dtype):
    x = torch.randn(2, 300, 768, device="cuda", dtype=dtype)
    w, b = torch.randn(3072, 768, device="cuda", dtype=dtype) * 0.05, torch.randn(3072, device="cuda", dtype=dtype)
    ours = OPS.linear(x, w, b)
    assert ours.shape == (2, 300, 3072)
    assert torch.equal(ours, torch.nn.functional.linear(x, w, b))  # the same cuBLAS call
    assert torch.equal(OPS.linear(x, w, None), torch.nn.functional.linear(x, w))


@cuda_test
def test_cuda_contract():
    """The CUDA entry points run the same validators, and check ids and indices on the device."""
    x = torch.randn(4, 8, device="cuda")
    w, b = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    with raises(r"bias_residual_layer_norm: weight is on cpu, expected cuda:0 \(the device of x\)"):
        OPS.bias_residual_layer_norm(x, w.cpu(), b, 1e-5, None, None)
    with raises(r"bias_act: x must be float32, bfloat16 or float16, got Double"):
        OPS.bias_act(x.double(), None, "gelu")
    with raises(r"linear: bias is on cpu, expected cuda:0"):
        OPS.linear(x, torch.randn(3, 8, device="cuda"), torch.randn(3))
    with raises(r"gather_rows: index 4 is out of range \[0, 4\)"):
        OPS.gather_rows(x, torch.tensor([0, 4], device="cuda"))
    with raises(r"scatter_rows: index -1 is out of range \[0, 6\)"):
        OPS.scatter_rows(x, torch.tensor([0, 1, -1, 2], device="cuda"), 6)
    with raises(r"varlen_attention: cu_seqlens is on cpu, expected cuda:0"):
        q = torch.randn(4, 2, 8, device="cuda")
        OPS.varlen_attention(q, q, q, torch.tensor([0, 4]), 4, 1.0)
    args = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in _embed_kwargs().items()}
    with raises(r"embed_layer_norm: input_ids value 10 is out of range \[0, 10\)"):
        OPS.embed_layer_norm(*{**args, "input_ids": torch.tensor([[1, 10, 3]], device="cuda")}.values())
    with raises(r"embed_layer_norm: position_ids value -1 is out of range \[0, 4\)"):
        OPS.embed_layer_norm(*{**args, "position_ids": torch.tensor([[0, -1, 2]], device="cuda")}.values())
    with raises(r"embed_layer_norm: token_type_ids is on cpu, expected cuda:0 \(the device of word_emb\)"):
        OPS.embed_layer_norm(*{**args, "token_type_ids": torch.tensor([[0, 1, 0]])}.values())
    torch.cuda.synchronize()  # nothing above reached a kernel with bad indices


@cuda_test
def test_cuda_bad_ids_under_graph_capture_poison_rows_instead_of_reading_out_of_bounds():
    """Under CUDA graph capture the host-side range check cannot run; the kernels bound-check."""
    args = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in _embed_kwargs().items()}
    args["input_ids"] = torch.tensor([[1, 10**9, 3]], device="cuda")
    x = torch.randn(4, 8, device="cuda")
    bad_idx = torch.tensor([0, 10**9], device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up outside capture would raise: capture directly
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            emb = OPS.embed_layer_norm(*args.values())
            rows = OPS.gather_rows(x, bad_idx)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(emb[0, [0, 2]]).all() and torch.isnan(emb[0, 1]).all()
    assert torch.equal(rows[0], x[0]) and torch.isnan(rows[1]).all()
