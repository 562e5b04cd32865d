"""Gradients of the fused forward kernels: one ``autograd.Function`` whose backward is chosen per call.

Both entry points run the fast kernel in the forward pass and save its tensor inputs:

* :func:`fused_backward`: in the backward pass, call the op's own backward kernel
  (``bwd(grad_out, *args)`` returning one gradient per differentiable input), used by the ops that
  declare one for the backend.
* :func:`fast_forward_ref_backward`: in the backward pass, recompute the op with its plain-PyTorch
  ``_ref`` and differentiate that. The gradient is therefore exactly the reference's gradient
  (never a silently wrong one); the price is one extra reference forward per op in backward. Used
  by every op whose Triton or C++ backend is called with tensors that require grad and has no
  backward kernel.

The recorded node (``out.grad_fn``) carries ``fused``: whether its backward is the kernel's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _ref_grads(ref_fn: Callable, saved: Sequence, needs: Sequence[bool], grad_out: torch.Tensor) -> list:
    """Gradients of ``ref_fn(*saved)`` for the inputs that need one (``None`` for the others)."""
    inputs = [t.detach().requires_grad_(True) if (t is not None and need) else t for t, need in zip(saved, needs)]
    wrt = [t for t, need in zip(inputs, needs) if t is not None and need]
    with torch.enable_grad():
        out = ref_fn(*inputs)
    grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    return [next(grads) if (t is not None and need) else None for t, need in zip(saved, needs)]


def _kernel_grads(bwd_fn: Callable, saved: Sequence, needs: Sequence[bool], grad_out: torch.Tensor) -> list:
    """Gradients by the backward kernel ``bwd_fn(grad_out, *saved)``, in each input's dtype."""
    grads = bwd_fn(grad_out.contiguous(), *saved)
    # the kernels accumulate parameter gradients in fp32; autograd wants the input's dtype
    return [
        g.to(t.dtype) if (need and t is not None and g is not None) else None for t, need, g in zip(saved, needs, grads)
    ]


class _FastForward(torch.autograd.Function):
    """``fast_fn(*tensors)`` forward; backward by ``bwd_fn`` when given, else through ``ref_fn``."""

    @staticmethod
    def forward(ctx, fast_fn: Callable, ref_fn: Callable | None, bwd_fn: Callable | None, *tensors):  # type: ignore[override]
        ctx.ref_fn, ctx.bwd_fn, ctx.fused = ref_fn, bwd_fn, bwd_fn is not None
        ctx.save_for_backward(*tensors)
        return fast_fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad[3:]
        if ctx.fused:
            grads = _kernel_grads(ctx.bwd_fn, saved, needs, grad_out)
        else:
            grads = _ref_grads(ctx.ref_fn, saved, needs, grad_out)
        return (None, None, None, *grads)


def fast_forward_ref_backward(fast_fn: Callable, ref_fn: Callable, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fast_fn(*tensors)`` forward, gradient of ``ref_fn(*tensors)`` backward."""
    return _FastForward.apply(fast_fn, ref_fn, None, *tensors)


def fused_backward(fast_fn: Callable, bwd_fn: Callable, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fast_fn(*tensors)`` forward, ``bwd_fn(grad_out, *tensors)`` (one gradient per tensor) backward."""
    return _FastForward.apply(fast_fn, None, bwd_fn, *tensors)
