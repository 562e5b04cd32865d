"""Fused bias + activation: ``y = act(x + bias)`` for BERT's intermediate (FFN up) projection.

The GEMM runs without its bias; the bias add and the activation are one elementwise pass:
2 N I elements moved (read x, write y) instead of 4 for the unfused pair (I = intermediate size,
4 H in BERT; the largest activation of the layer). Memory-bound.

Activations (HF ``hidden_act`` -> our name):

* ``gelu`` -> ``"gelu"``: exact, ``0.5 x (1 + erf(x / sqrt 2))``.
* ``gelu_new``, ``gelu_pytorch_tanh`` -> ``"gelu_tanh"``:
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
* ``relu`` -> ``"relu"``.

Numerics: computed in fp32 inside the fused kernels, rounded once to the output dtype.

Backends: ``torch`` (:func:`bias_act_ref`), ``triton``, ``cpp``; forward-only fused kernels get the
reference backward under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._autograd import fast_forward_ref_backward

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")

#: HF ``config.hidden_act`` values we support, mapped to our activation names.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, activation: str, upcast: bool = False) -> torch.Tensor:
    """Plain PyTorch: ``act(x + bias)``; ``upcast=True`` computes in fp32 and casts back."""
    dtype = x.dtype
    h = x.float() if upcast else x
    if bias is not None:
        h = h + (bias.float() if upcast else bias)
    if activation == "gelu":
        y = F.gelu(h)
    elif activation == "gelu_tanh":
        y = F.gelu(h, approximate="tanh")
    elif activation == "relu":
        y = F.relu(h)
    else:
        raise ValueError(f"bias_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return y.to(dtype)


def _triton_support(x: torch.Tensor) -> str | None:
    if globals().get("bias_act_fwd") is None:
        return "Triton kernel not available in this build"
    return None


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, activation: str, *, backend: str | None = None
) -> torch.Tensor:
    """``act(x + bias)`` fused; ``x``: (..., I), ``bias``: (I,) or ``None``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_act: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},)")
    be = _backend.resolve("bias_act", x.device, backend, supports={"triton": _triton_support(x)})
    if be == "torch":
        return bias_act_ref(x, bias, activation)
    if be == "triton":

        def fast(x, bias):
            return bias_act_fwd(x, bias, activation)  # noqa: F821

    else:
        from . import _cpp

        def fast(x, bias):
            return _cpp.bias_act(x, bias, activation)

    if _backend.needs_grad(x, bias):
        return fast_forward_ref_backward(fast, lambda x, bias: bias_act_ref(x, bias, activation), x, bias)
    return fast(x, bias)


# --- Triton kernels (issue 3) -------------------------------------------------------------------
