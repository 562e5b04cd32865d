"""Gradients of the fused forward kernels.

:func:`fused_backward` runs the fast kernel in the forward pass, saves its tensor inputs, and in
the backward pass calls the op's own backward kernel (``bwd(grad_out, *args)`` returning one
gradient per differentiable input), used by the ops that declare one for the backend.

:func:`fast_forward_ref_backward` runs the fast kernel in the forward pass and, in the backward
pass, recomputes the op with its plain-PyTorch ``_ref`` and differentiates that. The gradient is
therefore exactly the reference's gradient (never a silently wrong one); the price is one extra
reference forward per op in backward. Used by every op whose Triton or C++ backend is called
with tensors that require grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _RefBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast_fn: Callable, ref_fn: Callable, *tensors):  # type: ignore[override]
        ctx.ref_fn = ref_fn
        ctx.save_for_backward(*tensors)
        return fast_fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        inputs = [
            t.detach().requires_grad_(True) if (t is not None and need) else t for t, need in zip(saved, needs)
        ]
        wrt = [t for t, need in zip(inputs, needs) if t is not None and need]
        with torch.enable_grad():
            out = ctx.ref_fn(*inputs)
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
        return (None, None, *[next(grads) if (t is not None and need) else None for t, need in zip(saved, needs)])


def fast_forward_ref_backward(fast_fn: Callable, ref_fn: Callable, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fast_fn(*tensors)`` forward, gradient of ``ref_fn(*tensors)`` backward."""
    return _RefBackward.apply(fast_fn, ref_fn, *tensors)


class _FusedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast_fn: Callable, bwd_fn: Callable, *tensors):  # type: ignore[override]
        ctx.bwd_fn = bwd_fn
        ctx.save_for_backward(*tensors)
        return fast_fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        grads = ctx.bwd_fn(grad_out.contiguous(), *saved)
        out = []
        for t, need, g in zip(saved, needs, grads):
            # the kernels accumulate parameter gradients in fp32; autograd wants the input's dtype
            out.append(g.to(t.dtype) if (need and t is not None and g is not None) else None)
        return (None, None, *out)


def fused_backward(fast_fn: Callable, bwd_fn: Callable, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fast_fn(*tensors)`` forward, ``bwd_fn(grad_out, *tensors)`` (one gradient per tensor) backward."""
    return _FusedBackward.apply(fast_fn, bwd_fn, *tensors)
