"""One encoder layer of the fused forward, and its per-layer lookups.

:func:`layers` gives each layer's modules and Parameters, looked up once and cached until any
Parameter, buffer or submodule is (re)assigned; :func:`layer_forward` runs one post-LayerNorm
layer through the plan's callables (:mod:`bert_fast._plan`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _plan
from .families import Family, LayerParts
from .kernels import _dropout


def _dense_residual_layer_norm(plan, dense, w, b, dropout, ln_w, ln_b, eps, h, residual, training: bool):
    """HF's ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dropout(dense(h)) + residual)``.

    In eval (or with dropout 0, or no dropout module) the GEMM runs without its bias, which is fused
    into the LayerNorm op. With active dropout, which sits between the biased projection and the
    residual add, a LayerNorm kernel that fuses dropout takes the bias and a fresh seed; otherwise the
    bias stays in the GEMM and the module's own dropout runs.
    """
    if training and dropout is not None and dropout.p > 0:
        if plan.layer_norm_dropout:
            h = plan.linear(h, w, None, _plan.packer(dense, w))
            return plan.layer_norm(h, ln_w, ln_b, eps, b, residual, float(dropout.p), _dropout.draw_seed())
        h = dropout(plan.linear(h, w, b, None))
        return plan.layer_norm(h, ln_w, ln_b, eps, None, residual)
    h = plan.linear(h, w, None, _plan.packer(dense, w))
    return plan.layer_norm(h, ln_w, ln_b, eps, b, residual)


class _Layer(NamedTuple):
    """One layer's modules and Parameters, looked up once (:func:`layers`), not per forward."""

    attn: torch.nn.Module  # owner of the fused QKV cache
    qkv: tuple  # (w_q, w_k, w_v, b_q, b_k, b_v)
    heads: int
    attn_dropout: float
    attn_out: torch.nn.Module
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    attn_out_dropout: torch.nn.Module | None
    attn_ln: tuple  # (weight, bias, eps)
    ffn_up: torch.nn.Module
    ffn_up_w: torch.Tensor
    ffn_up_b: torch.Tensor
    ffn_down: torch.nn.Module
    ffn_down_w: torch.Tensor
    ffn_down_b: torch.Tensor
    ffn_dropout: torch.nn.Module | None
    ffn_ln: tuple


def _prepare_layer(p: LayerParts, head_dim: int) -> _Layer:
    return _Layer(
        p.attn, (p.query.weight, p.key.weight, p.value.weight, p.query.bias, p.key.bias, p.value.bias),
        p.query.weight.shape[0] // head_dim,  # pruned heads shrink the projections, not head_dim
        p.attn_dropout, p.attn_out, p.attn_out.weight, p.attn_out.bias, p.attn_out_dropout,
        (p.attn_ln.weight, p.attn_ln.bias, p.attn_ln.eps),
        p.ffn_up, p.ffn_up.weight, p.ffn_up.bias, p.ffn_down, p.ffn_down.weight, p.ffn_down.bias, p.ffn_dropout,
        (p.ffn_ln.weight, p.ffn_ln.bias, p.ffn_ln.eps),
    )  # fmt: skip


def layers(model, fam: Family, config, head_dim: int) -> list[_Layer]:
    """Every layer's :class:`_Layer`, cached until a Parameter, buffer or submodule of any module is
    (re)assigned (:func:`bert_fast._plan.structure_epoch`). Parameters are held as objects: ``.to()``
    and in-place updates change what they hold, not which object they are. Under ``torch.compile``
    the lookup runs afresh (Dynamo guards on the modules it reads)."""
    if torch.compiler.is_compiling():  # traced: looked up afresh, no cache to lock or mutate
        return [_prepare_layer(fam.layer(layer, config), head_dim) for layer in fam.layers(model)]
    table = _plan._table(model)
    epoch = _plan.structure_epoch()
    cached = table.get("layers")
    if cached is None or cached[0] != epoch:
        cached = (epoch, [_prepare_layer(fam.layer(layer, config), head_dim) for layer in fam.layers(model)])
        table["layers"] = cached
    return cached[1]


def layer_forward(plan, p: _Layer, x: torch.Tensor, cu_seqlens, max_seqlen: int, head_dim: int, act: str,
                   training: bool):
    """One post-LayerNorm encoder layer (:class:`_Layer`: its modules and Parameters)."""
    n = x.shape[0]
    heads = p.heads
    if torch.is_grad_enabled() and any(t.requires_grad for t in p.qkv):
        # Training: three projections (as HF runs them) instead of one on the concatenated weight,
        # which would be copied every step and kept for backward (85 MB in BERT-base).
        w_q, w_k, w_v, b_q, b_k, b_v = p.qkv
        q, k, v = (plan.linear(x, w, b, None).view(n, heads, head_dim) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    else:
        w_qkv, b_qkv = _plan.fused_qkv_of(p.attn, p.qkv)
        qkv = plan.linear(x, w_qkv, b_qkv, _plan.packer(p.attn, w_qkv))
        q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)  # strided views, no copies
    dropout = p.attn_dropout if training else 0.0
    seed = _dropout.draw_seed() if dropout > 0 and plan.attention_dropout else None
    ctx = plan.attention(q, k, v, cu_seqlens, max_seqlen, head_dim**-0.5, dropout, seed)
    ctx = ctx.view(n, heads * head_dim)

    x = _dense_residual_layer_norm(
        plan, p.attn_out, p.attn_out_w, p.attn_out_b, p.attn_out_dropout, *p.attn_ln, ctx, x, training
    )
    h = plan.linear(x, p.ffn_up_w, None, _plan.packer(p.ffn_up, p.ffn_up_w))
    h = plan.bias_act(h, p.ffn_up_b, act)
    return _dense_residual_layer_norm(
        plan, p.ffn_down, p.ffn_down_w, p.ffn_down_b, p.ffn_dropout, *p.ffn_ln, h, x, training
    )
