"""Backend selection for the fused ops (DESIGN.md §3).

Backends:

* ``"triton"`` — our Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"cpp"``    — our C++/CUDA extension ``bert_fast._C`` on the tensor's device.
* ``"torch"``  — the plain-PyTorch ``<op>_ref`` functions (the oracle).
* ``"auto"``   — pick the best usable one per call; never raises.

Precedence: explicit ``backend=`` argument > :func:`use_backend` context > ``BERT_FAST_BACKEND``
environment variable > ``"auto"``.

Nothing here touches the GPU or Triton's driver at import time: probes are lazy and cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import torch

log = logging.getLogger("bert_fast.kernels")

BACKENDS = ("auto", "triton", "cpp", "torch")

#: The forward operators of the C++/CUDA extension, ``torch.ops.bert_fast.<name>`` (defined here, where
#: importing needs no extension, so tests and benchmarks can list them without it).
CPP_OPS = (
    "bias_residual_layer_norm",
    "bias_act",
    "embed_layer_norm",
    "varlen_attention",
    "unpad_mask",
    "gather_rows",
    "scatter_rows",
    "linear",
)

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("bert_fast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the fused ops inside it on backend ``name`` unless a call names its own."""
    token = _context_backend.set(_check_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, following the precedence rule (may be ``"auto"``)."""
    if backend is not None:
        return _check_name(backend)
    ctx = _context_backend.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("BERT_FAST_BACKEND")
    if env:
        return _check_name(env.strip().lower())
    return "auto"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        log.debug("triton not importable: %s", exc)
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Can our Triton kernels run on tensors of ``device``?"""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


_on_cpp_loaded: list[Callable[[], None]] = []


def on_cpp_loaded(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the extension is loaded (at once if it already is)."""
    _on_cpp_loaded.append(hook)
    if load_cpp_extension.cache_info().currsize and load_cpp_extension() is not None:
        hook()


@functools.cache
def load_cpp_extension():
    """Import ``bert_fast._C`` (registers ``torch.ops.bert_fast.*``); ``None`` when it is not built."""
    try:
        mod = importlib.import_module("bert_fast._C")
    except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
        log.debug("bert_fast._C not available: %s", exc)
        return None
    for hook in _on_cpp_loaded:  # the fake (meta) implementations of the ops, see _dispatch
        hook()
    return mod


def cpp_usable(device: torch.device) -> bool:
    """Is the extension built with kernels for ``device``?"""
    mod = load_cpp_extension()
    if mod is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(getattr(mod, "WITH_CUDA", False))
    return False


_CPP_HELP = (
    "the C++ extension bert_fast._C is not built{why}; rebuild with "
    "`BERT_FAST_BUILD_CPP=1 pip install --no-build-isolation -e .` (a C++17 compiler is needed; "
    "set BERT_FAST_BUILD_CUDA=1 with a CUDA build of torch and the CUDA toolkit for GPU kernels)"
)

_logged: set[tuple[str, str, str]] = set()


def _log_auto(op: str, device: torch.device, chosen: str, why: str) -> None:
    key = (op, device.type, chosen)
    if key not in _logged:
        _logged.add(key)
        log.debug("bert_fast: op %s on %s -> backend %s (%s)", op, device.type, chosen, why)


def resolve(
    op: str,
    device: torch.device,
    backend: str | None = None,
    *,
    supports: Mapping[str, str | None] | Callable[[str], str | None] | None = None,
    auto_order: tuple[str, ...] = ("triton", "cpp"),
) -> str:
    """Choose the concrete backend for one call of ``op`` on ``device``.

    ``supports`` says, per backend, ``None`` (this call can run there) or a reason string (it
    cannot, e.g. an unsupported shape): either a mapping (backends missing from it are assumed to
    support the call) or a function of the backend name, called only for backends that are
    candidates (usable on ``device`` and either requested or next in ``auto``'s order).
    An explicit backend that cannot serve the call raises :class:`BackendUnavailableError`;
    ``auto`` falls back silently (logged once at DEBUG); ``auto_order``: the fused backends ``auto``
    tries, in order, before ``torch``.
    """
    want = requested_backend(backend)
    if supports is None:
        reason_of: Callable[[str], str | None] = _no_reason
    elif callable(supports):
        reason_of = supports
    else:
        reason_of = supports.get
    if want == "auto":
        for be in auto_order:
            if be == "triton" and triton_usable(device) and reason_of("triton") is None:
                _log_auto(op, device, "triton", "CUDA tensor" if device.type == "cuda" else "TRITON_INTERPRET=1")
                return "triton"
            if be == "cpp" and cpp_usable(device) and reason_of("cpp") is None:
                _log_auto(op, device, "cpp", "extension built")
                return "cpp"
        _log_auto(op, device, "torch", "no faster backend usable")
        return "torch"
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_importable():
            raise BackendUnavailableError(f"{op}: backend 'triton' requested but triton is not installed")
        if not triton_usable(device):
            raise BackendUnavailableError(
                f"{op}: backend 'triton' needs CUDA tensors (got {device}); on CPU it runs only under "
                "the Triton interpreter (TRITON_INTERPRET=1, for tests)"
            )
    elif want == "cpp":
        if load_cpp_extension() is None:
            raise BackendUnavailableError(f"{op}: backend 'cpp' requested but " + _CPP_HELP.format(why=""))
        if not cpp_usable(device):
            raise BackendUnavailableError(
                f"{op}: backend 'cpp' has no kernels for {device.type} tensors; "
                + _CPP_HELP.format(why=f" with {device.type} support")
            )
    reason = reason_of(want)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {want!r} cannot serve this call: {reason}")
    return want


def _no_reason(backend: str) -> None:
    return None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this call (the fused kernels have forward passes only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
