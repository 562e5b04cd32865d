"""GPU tier of the Triton kernels: BERT-base / BERT-large shapes, fp16 and bf16, IEEE fp32 parity.

Skipped without CUDA (``gpu`` marker, tests/conftest.py). These run the compiled, autotuned
kernels. References are computed in float64 on the GPU, so the fp32 reference itself carries no
TF32 or reduced-precision error; half precision uses the half rule against it.
"""

from __future__ import annotations

import math

import bert_fast.kernels as K
import pytest
import torch
from bert_fast.kernels.activation import bias_act_fwd
from bert_fast.kernels.attention import varlen_attention_fwd
from bert_fast.kernels.embeddings import embed_layer_norm_fwd
from bert_fast.kernels.layer_norm import bias_residual_layer_norm_fwd
from tolerances import FP32_ATTN_ATOL, FP32_OP_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

pytestmark = pytest.mark.gpu

DEV = "cuda"
SHAPES = {"base": (768, 12), "large": (1024, 16)}  # hidden, heads (head_dim 64)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _lens(batch: int, max_len: int) -> list[int]:
    """Random lengths with the edge cases in: an empty row, a length-1 row, a full-length row."""
    g = torch.Generator().manual_seed(batch * 1000 + max_len)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g).tolist()
    lens[0], lens[1 % batch], lens[-1] = max_len, 1, 0
    return lens


def _compare(ours, ref64, same, atol, what):
    if ours.dtype == torch.float32:
        assert_close_fp32(ours, ref64.float(), atol, what)
    else:
        assert_half_rule(ours, same, ref64.float(), HALF_OP_FACTOR, what)


def _d(*ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["base", "large"])
def test_layer_norm_bert_shapes(dtype, model):
    hidden, _ = SHAPES[model]
    n = sum(_lens(32, 512))
    x = torch.randn(n, hidden, device=DEV).to(dtype)
    res = torch.randn(n, hidden, device=DEV).to(dtype)
    w, b, lb = (torch.randn(hidden, device=DEV).to(dtype) for _ in range(3))
    for linear_bias, residual in ((lb, res), (None, None)):
        ours = bias_residual_layer_norm_fwd(x, w, b, 1e-12, linear_bias, residual)
        ref = K.bias_residual_layer_norm_ref(*_d(x, w, b), 1e-12, *_d(linear_bias, residual))
        same = K.bias_residual_layer_norm_ref(x, w, b, 1e-12, linear_bias, residual)
        _compare(ours, ref, same, FP32_OP_ATOL, f"layer_norm {model} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["base", "large"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_bias_act_bert_shapes(dtype, model, activation):
    inter = 4 * SHAPES[model][0]
    x = (torch.randn(sum(_lens(32, 128)), inter, device=DEV) * 3).to(dtype)
    bias = torch.randn(inter, device=DEV).to(dtype)
    ours = bias_act_fwd(x, bias, activation)
    ref = K.bias_act_ref(*_d(x, bias), activation)
    _compare(ours, ref, K.bias_act_ref(x, bias, activation), FP32_OP_ATOL, f"bias_act {activation} {model} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["base", "large"])
def test_embed_layer_norm_bert_shapes(dtype, model):
    hidden, _ = SHAPES[model]
    lens = _lens(32, 512)
    n = sum(lens)
    word = (torch.randn(30522, hidden, device=DEV) * 0.05).to(dtype)
    pos = (torch.randn(512, hidden, device=DEV) * 0.05).to(dtype)
    typ = (torch.randn(2, hidden, device=DEV) * 0.05).to(dtype)
    w, b = (torch.rand(hidden, device=DEV) + 0.5).to(dtype), (torch.randn(hidden, device=DEV) * 0.1).to(dtype)
    ids = torch.randint(0, 30522, (n,), device=DEV)
    pids = torch.cat([torch.arange(length, device=DEV) for length in lens])
    tids = torch.randint(0, 2, (n,), device=DEV)
    for token_types, embeds in ((tids, None), (None, torch.randn(n, hidden, device=DEV).to(dtype))):
        ii = None if embeds is not None else ids
        ours = embed_layer_norm_fwd(ii, pids, token_types, word, pos, typ, w, b, 1e-12, embeds)
        ref = K.embed_layer_norm_ref(ii, pids, token_types, *_d(word, pos, typ, w, b), 1e-12, *_d(embeds))
        same = K.embed_layer_norm_ref(ii, pids, token_types, word, pos, typ, w, b, 1e-12, embeds)
        _compare(ours, ref, same, FP32_OP_ATOL, f"embed_layer_norm {model} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["base", "large"])
@pytest.mark.parametrize("batch,max_len", [(32, 512), (32, 128), (8, 37)])
def test_varlen_attention_bert_shapes(dtype, model, batch, max_len):
    hidden, heads = SHAPES[model]
    d = hidden // heads
    lens = _lens(batch, max_len)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    n = int(cu[-1])
    qkv = torch.randn(n, 3 * hidden, device=DEV).to(dtype)  # the fused projection's output
    q, k, v = qkv.view(n, 3, heads, d).unbind(1)  # strided views, no copy
    ours = varlen_attention_fwd(q, k, v, cu, max_len)
    assert ours.shape == (n, heads, d) and ours.is_contiguous()
    ref = K.varlen_attention_ref(*_d(q, k, v), cu, max_len)
    same = K.varlen_attention_ref(q, k, v, cu, max_len)
    _compare(ours, ref, same, FP32_ATTN_ATOL, f"attention {model} {dtype} B={batch} L={max_len}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [26, 32, 40, 80, 96, 128])
def test_varlen_attention_head_dims(dtype, head_dim):
    heads, lens = 4, _lens(6, 200)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    n = int(cu[-1])
    q, k, v = torch.randn(n, 3 * heads * head_dim, device=DEV).to(dtype).view(n, 3, heads, head_dim).unbind(1)
    ours = varlen_attention_fwd(q, k, v, cu, max(lens), 1.0 / math.sqrt(head_dim))
    ref = K.varlen_attention_ref(*_d(q, k, v), cu, max(lens))
    _compare(ours, ref, K.varlen_attention_ref(q, k, v, cu, max(lens)), FP32_ATTN_ATOL, f"d={head_dim} {dtype}")


def test_varlen_attention_more_programs_than_grid_dim():
    """batch * heads > 65535: launched in chunks of sequences."""
    heads, d, batch = 16, 64, 4200
    lens = [2] * batch
    cu = torch.arange(0, 2 * batch + 1, 2, dtype=torch.int32, device=DEV)
    q, k, v = torch.randn(2 * batch, 3 * heads * d, device=DEV, dtype=torch.float16).view(-1, 3, heads, d).unbind(1)
    ours = varlen_attention_fwd(q, k, v, cu, max(lens))
    ref = K.varlen_attention_ref(*_d(q, k, v), cu, max(lens))
    _compare(ours, ref, K.varlen_attention_ref(q, k, v, cu, max(lens)), FP32_ATTN_ATOL, "chunked launch")


def test_torch_compile_inductor_no_graph_break():
    hidden, heads = 768, 12
    lens = _lens(8, 128)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    n = int(cu[-1])
    w, b, lb = (torch.randn(hidden, device=DEV, dtype=torch.float16) for _ in range(3))
    bias = torch.randn(4 * hidden, device=DEV, dtype=torch.float16)

    def layer(qkv, x):
        q, k, v = qkv.view(n, 3, heads, hidden // heads).unbind(1)
        a = varlen_attention_fwd(q, k, v, cu, max(lens)).view(n, hidden)
        h = bias_residual_layer_norm_fwd(a, w, b, 1e-12, lb, x)
        return bias_act_fwd(h.repeat(1, 4), bias, "gelu")

    qkv = torch.randn(n, 3 * hidden, device=DEV, dtype=torch.float16)
    x = torch.randn(n, hidden, device=DEV, dtype=torch.float16)
    expected = layer(qkv, x)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(qkv, x)
    torch._dynamo.reset()
    assert torch.equal(got, expected)
