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

import torch
import torch.nn.functional as F

from . import _backend


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    cpp_reason = None if x.device.type == "cpu" else "the cpp linear is CPU-only (cuBLAS serves the GPU)"
    be = _backend.resolve("linear", x.device, backend, supports={"cpp": cpp_reason})
    if be == "cpp" and not _backend.needs_grad(x, weight, bias):
        from . import _cpp

        return _cpp.linear(x, weight, bias)
    # torch, triton (whose GEMMs are cuBLAS's), and anything under autograd
    return linear_ref(x, weight, bias)
