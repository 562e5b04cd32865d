"""Padding machinery: from a (B, L) attention mask to packed tokens and back.

* :func:`unpad_mask` -> ``(indices, cu_seqlens, max_seqlen)``: ``indices`` are the flat positions
  (``b * L + t``) of the real tokens in row-major order, ``cu_seqlens`` (B + 1,) int32 the prefix
  sums of the per-row lengths, ``max_seqlen`` a Python int (one host sync per batch).
* :func:`gather_rows` / :func:`scatter_rows`: (B*L, H) <-> (N, H). Scatter writes zeros at
  padded positions (our documented output for padding).

A row that is entirely padding simply contributes no tokens (length 0 in ``cu_seqlens``).

Backends: ``torch`` (the ``_ref`` functions, differentiable), ``cpp`` (CPU, and CUDA when the
extension is built with CUDA). ``triton`` runs the ``_ref`` functions, declared as its
implementation: there is no Triton kernel by design, since on the GPU these are one ``nonzero`` and
two indexed copies, already memory-bound in PyTorch's own kernels. Under autograd, gathers and
scatters run the (differentiable) reference on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch


def unpad_mask_ref(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``mask``: (B, L) of bool/int/float, nonzero = real token."""
    valid = mask != 0
    seqlens = valid.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return indices, cu_seqlens, max_seqlen


def gather_rows_ref(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(R, H) -> (N, H): rows ``indices`` of ``x``."""
    return x.index_select(0, indices)


def scatter_rows_ref(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(N, H) -> (num_rows, H): row ``indices[i]`` gets ``x[i]``; every other row is zero."""
    out = x.new_zeros((num_rows, *x.shape[1:]))
    return out.index_copy(0, indices.long(), x)  # index_copy takes int64 only; gather/scatter accept int32 too


def _fake_unpad_mask(mask):
    """Fake (meta) implementation of ``bert_fast::unpad_mask``."""
    # the number of tokens depends on the mask's values: a data-dependent size
    tokens = torch.library.get_ctx().new_dynamic_size()
    indices = mask.new_empty((tokens,), dtype=torch.int64)
    cu_seqlens = mask.new_empty((mask.shape[0] + 1,), dtype=torch.int32)
    max_seqlen = mask.new_empty((), dtype=torch.int32)
    return indices, cu_seqlens, max_seqlen


def _fake_gather_rows(x, indices):
    """Fake (meta) implementation of ``bert_fast::gather_rows``."""
    return x.new_empty((indices.shape[0], *x.shape[1:]))


def _fake_scatter_rows(x, indices, num_rows):
    """Fake (meta) implementation of ``bert_fast::scatter_rows``."""
    return x.new_empty((num_rows, *x.shape[1:]))


def _unpad_mask_cpp(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    indices, cu_seqlens, max_seqlen = torch.ops.bert_fast.unpad_mask(mask)
    return indices, cu_seqlens, int(max_seqlen.item())


def _gather_rows_cpp(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.ops.bert_fast.gather_rows(x, indices)


def _scatter_rows_cpp(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.ops.bert_fast.scatter_rows(x, indices, num_rows)


def unpad_mask(mask: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if mask.dim() != 2:
        raise ValueError(f"unpad_mask: expected a (batch, seq_len) mask, got shape {tuple(mask.shape)}")
    return UNPAD_MASK(backend, mask)


def gather_rows(x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    if indices.dim() != 1 or indices.is_floating_point():
        raise ValueError(f"gather_rows: indices must be 1-D integer row numbers, got {tuple(indices.shape)}")
    return GATHER_ROWS(backend, x, indices)


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int, *, backend: str | None = None) -> torch.Tensor:
    if indices.dim() != 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"scatter_rows: indices must be 1-D with one row number per row of x ({x.shape[0]}), got "
            f"{tuple(indices.shape)}"
        )
    return SCATTER_ROWS(backend, x, indices, int(num_rows))


for _name, _fake in (("unpad_mask", _fake_unpad_mask), ("gather_rows", _fake_gather_rows),
                     ("scatter_rows", _fake_scatter_rows)):
    _dispatch.register_cpp_fake(_name, _fake)

# ``auto`` never picks ``triton`` here (its entry is the reference): the extension's kernels first.
UNPAD_MASK = _dispatch.Op(
    "unpad_mask", unpad_mask_ref, {"triton": unpad_mask_ref, "cpp": _unpad_mask_cpp}, grad="ref", auto_order=("cpp",)
)
GATHER_ROWS = _dispatch.Op(
    "gather_rows", gather_rows_ref, {"triton": gather_rows_ref, "cpp": _gather_rows_cpp}, grad="ref",
    auto_order=("cpp",),
)
SCATTER_ROWS = _dispatch.Op(
    "scatter_rows", scatter_rows_ref, {"triton": scatter_rows_ref, "cpp": _scatter_rows_cpp}, grad="ref",
    auto_order=("cpp",),
)
