"""Thin wrappers over ``torch.ops.bert_fast.*`` (the C++/CUDA extension ``bert_fast._C``).

Owned by the C++ extension work (issue 4); the op files call these when the ``cpp`` backend is
chosen, after :func:`~bert_fast.kernels._backend.resolve` made sure the extension is loaded.

The operators are registered with the PyTorch dispatcher by ``csrc/ops.cpp``
(``TORCH_LIBRARY(bert_fast, m)``): CPU kernels always, CUDA kernels (``csrc/cuda``) when the
extension was built with them. This module adds their fake (meta) implementations, so that
``torch.compile`` can trace them and ``torch.library.opcheck`` passes. The ops are forward-only;
gradients come from the op files (reference backward, ``kernels/_autograd.py``).

Inputs are validated in C++ (``TORCH_CHECK``): a bad dtype, device, shape or stride raises a
``RuntimeError`` naming the op, the argument, the value and what was expected.
"""

from __future__ import annotations

import torch

from . import _backend

_ext = _backend.load_cpp_extension()
if _ext is None:
    raise ImportError("bert_fast.kernels._cpp: " + _backend._CPP_HELP.format(why=""))

_ops = torch.ops.bert_fast

#: Every operator of the extension, ``torch.ops.bert_fast.<name>``.
OPS = (
    "bias_residual_layer_norm",
    "bias_act",
    "embed_layer_norm",
    "varlen_attention",
    "unpad_mask",
    "gather_rows",
    "scatter_rows",
    "linear",
)


# --- fake implementations (shapes, dtypes, devices only; for torch.compile / opcheck) -----------


@torch.library.register_fake("bert_fast::bias_residual_layer_norm")
def _bias_residual_layer_norm_fake(x, weight, bias, eps, linear_bias=None, residual=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bert_fast::bias_act")
def _bias_act_fake(x, bias, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bert_fast::embed_layer_norm")
def _embed_layer_norm_fake(
    input_ids, position_ids, token_type_ids, word_emb, pos_emb, type_emb, weight, bias, eps, inputs_embeds=None
):
    return word_emb.new_empty((*position_ids.shape, word_emb.shape[1]))


@torch.library.register_fake("bert_fast::varlen_attention")
def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("bert_fast::unpad_mask")
def _unpad_mask_fake(mask):
    # the number of tokens depends on the mask's values: a data-dependent size
    tokens = torch.library.get_ctx().new_dynamic_size()
    indices = mask.new_empty((tokens,), dtype=torch.int64)
    cu_seqlens = mask.new_empty((mask.shape[0] + 1,), dtype=torch.int32)
    max_seqlen = mask.new_empty((), dtype=torch.int32)
    return indices, cu_seqlens, max_seqlen


@torch.library.register_fake("bert_fast::gather_rows")
def _gather_rows_fake(x, indices):
    return x.new_empty((indices.shape[0], *x.shape[1:]))


@torch.library.register_fake("bert_fast::scatter_rows")
def _scatter_rows_fake(x, indices, num_rows):
    return x.new_empty((num_rows, *x.shape[1:]))


# --- wrappers with the call signatures the op files use -----------------------------------------


def bias_residual_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    linear_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    return _ops.bias_residual_layer_norm(x, weight, bias, float(eps), linear_bias, residual)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return _ops.bias_act(x, bias, activation)


def embed_layer_norm(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    type_emb: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    return _ops.embed_layer_norm(
        input_ids, position_ids, token_type_ids, word_emb, pos_emb, type_emb, weight, bias, float(eps), inputs_embeds
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    if q.device.type != "cpu":
        raise _backend.BackendUnavailableError(
            f"varlen_attention: the cpp backend has a CPU kernel only (got {q.device} tensors); "
            "use backend='triton' or 'torch' on the GPU"
        )
    return _ops.varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), float(scale))


def unpad_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    indices, cu_seqlens, max_seqlen = _ops.unpad_mask(mask)
    return indices, cu_seqlens, int(max_seqlen.item())


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return _ops.gather_rows(x, indices)


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    return _ops.scatter_rows(x, indices, num_rows)


@torch.library.register_fake("bert_fast::linear")
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _ops.linear(x, weight, bias)
