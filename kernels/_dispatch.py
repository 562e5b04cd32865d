"""One dispatch mechanism for every fused op.

An op file declares its op once, as an :class:`Op`: the reference (``torch`` backend, also the
gradient under autograd), an implementation per other backend (a callable, or a dict from device
type to callable), and per backend a *support check* — a function of the call's arguments that
returns ``None`` when that backend can serve the call, else the reason it cannot. Every
implementation of one op takes the same positional arguments (the op's canonical signature).

* :meth:`Op.__call__` is what the public functional ends with, after it validated the arguments:
  resolve the backend for this call (:func:`~bert_fast.kernels._backend.resolve`; support checks
  are evaluated only for backends that are candidates) and run it.
* :meth:`Op.select` returns the callable for one backend, device and grad mode. The model resolves
  it once per forward plan and then calls it directly, with no resolution and no validation per
  call (the model validated its inputs at the boundary).

Under autograd a forward-only fused implementation is wrapped so that its backward is the
reference's (``grad="ref_backward"``, :mod:`~bert_fast.kernels._autograd`), or the reference runs
instead (``grad="ref"``: ops whose reference is already the fast path under autograd, e.g. the
GEMM, or that have no gradient worth fusing, e.g. the row gathers).

C++ ops: each op module registers its fake (meta) implementation here once
(:func:`register_cpp_fake`); it is attached to ``bert_fast::<op>`` when the extension is loaded and
is the same function the Triton custom op (``bert_fast_triton::<op>_fwd``) uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from . import _backend
from ._autograd import fast_forward_ref_backward, fused_backward

Impl = Callable[..., object]
Support = Callable[..., "str | None"]


#: Floating dtypes every fused kernel (Triton and C++) takes.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_dtypes(*args) -> str | None:
    """Support check shared by the fused backends: every floating tensor argument in fp32/bf16/fp16."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype not in FUSED_DTYPES:
            return f"dtype {a.dtype} is not supported (fp32, bf16, fp16)"
    return None


class Op:
    """A fused op: its implementations and support checks per backend (see the module docstring).

    ``device_arg``: index of the argument whose device decides the backend. ``grad_args``: indices
    of the arguments that may require grad (the inputs of the reference backward). ``auto_order``:
    the fused backends ``auto`` tries, in order (an op whose ``triton`` entry is the reference lists
    only ``cpp``).
    """

    def __init__(
        self,
        name: str,
        ref: Impl,
        impls: Mapping[str, Impl | Mapping[str, Impl]],
        *,
        supports: Mapping[str, Support] | None = None,
        device_arg: int = 0,
        grad_args: Sequence[int] = (0,),
        grad: str = "ref_backward",
        auto_order: tuple[str, ...] = ("triton", "cpp"),
        backward: Mapping[str, Impl | Mapping[str, Impl]] | None = None,
    ) -> None:
        assert grad in ("ref_backward", "ref")
        self.name = name
        self.ref = ref
        self.impls = dict(impls)
        self.supports = dict(supports or {})
        self.device_arg = device_arg
        self.grad_args = tuple(grad_args)
        self.grad = grad
        self.auto_order = auto_order
        # Fused backward kernels per backend (callable, or device type -> callable):
        # ``bwd(grad_out, *args)`` -> one gradient per ``grad_args`` entry. Where none is declared
        # for the backend and device, the reference backward is used.
        self.backward = dict(backward or {})

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={['torch', *self.impls]})"

    # ---- resolution ---------------------------------------------------------------------------
    def reason(self, backend: str, args: Sequence[object]) -> str | None:
        """Why ``backend`` cannot serve ``args`` (``None``: it can)."""
        if backend == "torch":
            return None
        check = self.supports.get(backend)
        return check(*args) if check is not None else None

    def resolve(self, device: torch.device, backend: str | None, args: Sequence[object]) -> str:
        """The concrete backend for a call with ``args`` (raises for an explicit backend that cannot)."""
        return _backend.resolve(
            self.name, device, backend, supports=lambda be: self.reason(be, args), auto_order=self.auto_order
        )

    def impl(self, backend: str, device: torch.device) -> Impl:
        """The forward implementation of ``backend`` on ``device`` (no autograd handling)."""
        if backend == "torch":
            return self.ref
        impl = self.impls[backend]
        if isinstance(impl, Mapping):
            impl = impl.get(device.type, impl.get("default"))
            if impl is None:
                raise _backend.BackendUnavailableError(f"{self.name}: backend {backend!r} has no {device.type} kernel")
        return impl

    def select(self, backend: str, device: torch.device, grad: bool) -> Impl:
        """The callable to run for ``backend`` on ``device``; ``grad``: autograd may record calls."""
        fast = self.impl(backend, device)
        if backend == "torch" or not grad:
            return fast
        idx, ref = self.grad_args, self.ref
        bwd = self.backward.get(backend)
        if isinstance(bwd, Mapping):
            bwd = bwd.get(device.type, bwd.get("default"))
        if bwd is not None and not getattr(bwd, "available", lambda: True)():
            bwd = None  # e.g. an extension built before its backward op existed: reference backward
        if bwd is None and self.grad == "ref":

            def run_ref_under_grad(*args):
                return (ref if _backend.needs_grad(*(args[i] for i in idx)) else fast)(*args)

            return run_ref_under_grad

        def run_under_grad(*args):
            tensors = [args[i] for i in idx]
            if not _backend.needs_grad(*tensors):
                return fast(*args)

            def full(ts) -> list:
                """``args`` with the differentiable ones replaced by ``ts`` (autograd's inputs)."""
                out = list(args)
                for i, t in zip(idx, ts):
                    out[i] = t
                return out

            def fast_fn(*ts):
                return fast(*full(ts))

            if bwd is not None:
                return fused_backward(fast_fn, lambda g, *ts: bwd(g, *full(ts)), *tensors)
            return fast_forward_ref_backward(fast_fn, lambda *ts: ref(*full(ts)), *tensors)

        return run_under_grad

    def __call__(self, backend: str | None, *args):
        """Resolve the backend for this call and run it (the public functional's last step)."""
        device = args[self.device_arg].device  # type: ignore[union-attr]
        be = self.resolve(device, backend, args)
        return self.select(be, device, torch.is_grad_enabled())(*args)


# ---- fakes of the C++ ops ------------------------------------------------------------------------

_cpp_fakes: dict[str, Callable] = {}
_cpp_fakes_registered = False


def register_cpp_fake(name: str, fake: Callable) -> Callable:
    """Record ``fake`` as the fake implementation of ``bert_fast::<name>`` (attached at extension load)."""
    _cpp_fakes[name] = fake
    if _cpp_fakes_registered and hasattr(torch.ops.bert_fast, name):
        torch.library.register_fake(f"bert_fast::{name}")(fake)
    return fake


def _register_cpp_fakes() -> None:
    global _cpp_fakes_registered
    if _cpp_fakes_registered:
        return
    _cpp_fakes_registered = True
    for name, fake in _cpp_fakes.items():
        if hasattr(torch.ops.bert_fast, name):  # an older build may lack newer (backward) ops
            torch.library.register_fake(f"bert_fast::{name}")(fake)


_backend.on_cpp_loaded(_register_cpp_fakes)
