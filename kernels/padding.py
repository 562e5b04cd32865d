"""Padding machinery: from a (B, L) attention mask to packed tokens and back.

* :func:`unpad_mask` -> ``(indices, cu_seqlens, max_seqlen)``: ``indices`` are the flat positions
  (``b * L + t``) of the real tokens in row-major order, ``cu_seqlens`` (B + 1,) int32 the prefix
  sums of the per-row lengths, ``max_seqlen`` a Python int (one host sync per batch).
* :func:`gather_rows` / :func:`scatter_rows`: (B*L, H) <-> (N, H). Scatter writes zeros at
  padded positions (our documented output for padding).

A row that is entirely padding simply contributes no tokens (length 0 in ``cu_seqlens``).

Backends: ``torch`` (the ``_ref`` functions, differentiable), ``cpp``. There is no Triton
version: on the GPU these are one ``nonzero`` and two indexed copies, already memory-bound in
PyTorch's own kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend


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
    return out.index_copy(0, indices, x)


_NO_TRITON = {"triton": "no Triton kernel for this op (PyTorch's indexing kernels are used on the GPU)"}


def _pick(op: str, device: torch.device, backend: str | None) -> str:
    if _backend.requested_backend(backend) == "triton":
        # No Triton kernel by design: with the triton backend (which must still be usable on this
        # device, else this raises) the torch indexing ops are the fast path.
        _backend.resolve(op, device, "triton")
        return "torch"
    return _backend.resolve(op, device, backend, supports=_NO_TRITON)


def unpad_mask(mask: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    if mask.dim() != 2:
        raise ValueError(f"unpad_mask: expected a (batch, seq_len) mask, got shape {tuple(mask.shape)}")
    if _pick("unpad_mask", mask.device, backend) == "cpp":
        from . import _cpp

        return _cpp.unpad_mask(mask)
    return unpad_mask_ref(mask)


def gather_rows(x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    if _pick("gather_rows", x.device, backend) == "cpp" and not _backend.needs_grad(x):
        from . import _cpp

        return _cpp.gather_rows(x, indices)
    return gather_rows_ref(x, indices)


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int, *, backend: str | None = None) -> torch.Tensor:
    if _pick("scatter_rows", x.device, backend) == "cpp" and not _backend.needs_grad(x):
        from . import _cpp

        return _cpp.scatter_rows(x, indices, num_rows)
    return scatter_rows_ref(x, indices, num_rows)
