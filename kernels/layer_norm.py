"""Fused bias + residual + LayerNorm: ``y = LayerNorm(x + linear_bias + residual) * weight + bias``.

Where it sits in BERT: after the attention output projection and after the FFN output
projection, HF computes ``LayerNorm(dropout(dense(x)) + residual)``. In eval mode dropout is the
identity, so we run the GEMM *without* its bias and fold bias add, residual add and the whole
LayerNorm into one pass over the row.

Bytes: unfused, HF reads/writes the (N, H) activation about 5 times (bias add, residual add,
LayerNorm reads twice and writes once); fused, we read x and residual once and write y once:
3 N H elements plus 3 H for the parameters. FLOPs (~8 N H) are negligible: the op is memory-bound.

Numerics: statistics (mean, biased variance) in fp32 whatever the input dtype; ``eps`` is used
exactly as given (BERT uses 1e-12, which is below fp16's resolution: it must not be clamped).

Backends: ``torch`` (:func:`bias_residual_layer_norm_ref`), ``triton``, ``cpp``. Gradients: the
fused backends are forward-only; under autograd they are wrapped by
:func:`~bert_fast.kernels._autograd.fast_forward_ref_backward` (reference backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._autograd import fast_forward_ref_backward


def bias_residual_layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    linear_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch, HF's exact order of operations: ``LN((x + linear_bias) + residual)``.

    ``upcast=True`` computes in fp32 and casts the result back to ``x.dtype`` (the oracle for
    half-precision comparisons).
    """
    dtype = x.dtype
    h = x.float() if upcast else x
    if linear_bias is not None:
        h = h + (linear_bias.float() if upcast else linear_bias)
    if residual is not None:
        h = h + (residual.float() if upcast else residual)
    w, b = (weight.float(), bias.float()) if upcast else (weight, bias)
    return F.layer_norm(h, (h.shape[-1],), w, b, eps).to(dtype)


def _check(x, weight, bias, linear_bias, residual) -> None:
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("linear_bias", linear_bias)):
        if t is not None and t.shape != (hidden,):
            raise ValueError(f"bias_residual_layer_norm: {name} has shape {tuple(t.shape)}, expected ({hidden},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"bias_residual_layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("linear_bias", linear_bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"bias_residual_layer_norm: {name} is on {t.device}, x on {x.device}")


def _triton_support(x: torch.Tensor) -> str | None:
    fwd = globals().get("bias_residual_layer_norm_fwd")
    if fwd is None:
        return "Triton kernel not available in this build"
    check = globals().get("_triton_unsupported")
    return check(x) if check is not None else None


def bias_residual_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    linear_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x + linear_bias + residual)`` over the last dim, fused. ``x``: (..., H)."""
    _check(x, weight, bias, linear_bias, residual)
    be = _backend.resolve("bias_residual_layer_norm", x.device, backend, supports={"triton": _triton_support(x)})
    if be == "torch":
        return bias_residual_layer_norm_ref(x, weight, bias, eps, linear_bias, residual)
    if be == "triton":

        def fast(x, weight, bias, linear_bias, residual):
            return bias_residual_layer_norm_fwd(x, weight, bias, eps, linear_bias, residual)  # noqa: F821

    else:
        from . import _cpp

        def fast(x, weight, bias, linear_bias, residual):
            return _cpp.bias_residual_layer_norm(x, weight, bias, eps, linear_bias, residual)

    args = (x, weight, bias, linear_bias, residual)
    if _backend.needs_grad(*args):

        def ref(x, weight, bias, linear_bias, residual):
            return bias_residual_layer_norm_ref(x, weight, bias, eps, linear_bias, residual)

        return fast_forward_ref_backward(fast, ref, *args)
    return fast(*args)


# --- Triton kernels (issue 3) -------------------------------------------------------------------
