"""``linear(x, weight, bias)`` = ``x @ weight.T + bias``: the GEMMs of the model, one entry point.

The GEMM itself is never ours: cuBLAS on the GPU, oneDNN / MKL on the CPU. What the ``cpp``
backend adds on the CPU is the way a half-precision GEMM is spread over threads (see
``csrc/linear.cpp``: one single-threaded oneDNN GEMM per block of rows, which beat oneDNN's own
2-thread split of BERT's shapes on AMX machines). fp32, small batches and everything under
autograd run ``torch.nn.functional.linear`` unchanged.

Backends: ``torch`` / ``triton`` -> :func:`linear_ref` (there is no Triton GEMM of ours: cuBLAS is
the right engine), ``cpp`` -> ``torch.ops.bert_fast.linear`` on CPU tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import _backend


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


#: At most this many rows, a GEMM on prepacked oneDNN weights beats both ``F.linear`` and the
#: row split (measured per BERT-base layer, 2 threads: 16 rows fp32 5.5 -> 2.5 ms, bf16 2.0 ->
#: 0.9 ms; 128 rows fp32 14.7 -> 12.4 ms, bf16 7.3 -> 3.5 ms; at 524 rows fp32 was 9% slower).
PACKED_MAX_ROWS = 256


@functools.cache
def _mkldnn_linear_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (an opaque tensor for :func:`linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    packed: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``. ``packed``: returns :func:`prepack_weight` of ``weight`` (cached by
    the caller); called only when the small-batch prepacked path is taken."""
    cpp_reason = None if x.device.type == "cpu" else "the cpp linear is CPU-only (cuBLAS serves the GPU)"
    be = _backend.resolve("linear", x.device, backend, supports={"cpp": cpp_reason})
    if be == "cpp" and not _backend.needs_grad(x, weight, bias):
        rows = x.numel() // max(1, x.shape[-1])
        if packed is not None and x.dim() == 2 and rows <= PACKED_MAX_ROWS and _mkldnn_linear_available():
            return torch.ops.mkldnn._linear_pointwise(x, packed(), bias, "none", [], "")
        from . import _cpp

        return _cpp.linear(x, weight, bias)
    # torch, triton (whose GEMMs are cuBLAS's), and anything under autograd
    return linear_ref(x, weight, bias)
