"""``linear(x, weight, bias)`` = ``x @ weight.T + bias``: the GEMMs of the model, one entry point.

The GEMM is cuBLAS's on the GPU and oneDNN / MKL's on the CPU, with one exception: small fp32
batches on a CPU with AVX2 + FMA run our SGEMM on weights packed once into 16-column panels
(``csrc/cpu/sgemm_avx2.cpp``; 1.4-1.5x oneDNN's prepacked GEMM at 16 rows, see
:data:`SGEMM_MAX_ROWS`). What else the ``cpp`` backend adds on the CPU is the way a half-precision
GEMM is spread over threads (see ``csrc/linear.cpp``: one single-threaded oneDNN GEMM per block of
rows, which beat oneDNN's own 2-thread split of BERT's shapes on AMX machines). Everything under
autograd runs ``torch.nn.functional.linear`` unchanged.

What each backend runs (declared in :data:`OP`, never substituted silently):

* ``torch`` -> :func:`linear_ref` (``F.linear``).
* ``triton`` -> :func:`linear_ref` as well: there is no Triton GEMM of ours; on the GPU the GEMM is
  cuBLAS's, which is the right engine (under the interpreter, on CPU, it is oneDNN/MKL's).
* ``cpp`` on CPU -> for fp32 up to :data:`SGEMM_MAX_ROWS` rows, our SGEMM on weights packed into
  16-column panels (``torch.ops.bert_fast.sgemm_packed_linear``, AVX2 + FMA, chosen at run time; when
  the caller's ``packed`` offers ``packed.sgemm()``); else prepacked oneDNN weights for small batches,
  else ``torch.ops.bert_fast.linear``
  (the row split for half precision); on CUDA -> ``torch.ops.bert_fast.linear`` when the extension
  registers a CUDA kernel for it, else cuBLAS through :func:`linear_ref`.
* Under autograd every backend runs :func:`linear_ref` (differentiable as is).
* Under ``torch.compile`` (``torch.compiler.is_compiling()``) the ``cpp`` backend on CPU runs
  ``F.linear`` as well: the compiler chooses the GEMM, and no prepacked weight or probe enters the graph.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import _dispatch

log = logging.getLogger("bert_fast.kernels")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


#: At most this many rows, a GEMM on prepacked oneDNN weights beats both ``F.linear`` and the
#: row split (measured per BERT-base layer, 2 threads: 16 rows fp32 5.5 -> 2.5 ms, bf16 2.0 ->
#: 0.9 ms; 128 rows fp32 14.7 -> 12.4 ms, bf16 7.3 -> 3.5 ms; at 524 rows fp32 was 9% slower).
PACKED_MAX_ROWS = 256

#: Above this many rows, the row count given to the prepacked GEMM is rounded up to a multiple of it
#: (zero rows appended, their outputs sliced off). oneDNN creates and caches one primitive, with its
#: JIT code, per distinct row count: a stream of random batch shapes otherwise grows resident memory
#: by ~0.5 MB per new token count (benchmarks/soak.py). With the rounding, at most
#: ``2 * PACKED_ROW_BUCKET`` row counts (here 32) per weight shape ever reach oneDNN.
PACKED_ROW_BUCKET = 16


#: At most this many rows, fp32 GEMMs run our SGEMM on packed weights (csrc/cpu/sgemm_avx2.cpp) where
#: this CPU has AVX2 + FMA, instead of the oneDNN-prepacked GEMM. Measured (benchmarks/small_gemm.py,
#: AMD EPYC with AVX2, 1 thread, BERT-base's four shapes, median of 15, side by side): faster than
#: oneDNN prepacked at every M measured, 1.26-1.56x at M = 1, 1.37-1.51x at 16, 1.10-1.14x at 64,
#: 1.02-1.05x at 256 (GFLOP/s at 256: ours 36.5-37.3, oneDNN 35.5-36.4); no cross-over up to 256, so
#: the limit is oneDNN's small-batch limit. No row bucketing needed: the op keeps no per-shape state.
SGEMM_MAX_ROWS = 256


def _packed_rows(rows: int) -> int:
    """The row count the prepacked GEMM runs for ``rows`` rows (see :data:`PACKED_ROW_BUCKET`)."""
    if rows <= PACKED_ROW_BUCKET:
        return rows
    return -(-rows // PACKED_ROW_BUCKET) * PACKED_ROW_BUCKET


def _cpu_capability() -> str:
    """ATen's vector ISA on this CPU (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...), read at run time."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def _onednn_half_isa(dtype: torch.dtype) -> bool:
    """oneDNN's own check that this CPU can reorder ``dtype`` (bf16/fp16) weights: AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT (e.g. AMD EPYC with AVX2 only has neither, and the prepack raises there)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


def _probe_mkldnn_linear(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether oneDNN's prepacked linear runs ``dtype`` on this CPU, and why (one tiny trial call)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False, "this torch has no oneDNN linear"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"{dtype} is not a oneDNN linear dtype"
    if not _onednn_half_isa(dtype):
        return False, f"oneDNN cannot reorder {dtype} weights on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
    # The ISA checks above are oneDNN's; a trial prepack + GEMM catches anything they miss, once.
    try:
        with torch.no_grad():
            x, w = torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype)
            y = torch.ops.mkldnn._linear_pointwise(x, prepack_weight(w), None, "none", [], "")
        if y.shape != (2, 8) or not bool((y.float() == 16).all()):
            return False, "the trial prepacked GEMM returned a wrong result"
    except RuntimeError as exc:
        return False, f"the trial prepack failed: {exc}"
    return True, "oneDNN prepacked weights"


@functools.cache
def _mkldnn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's prepacked linear runs ``dtype`` on this CPU: probed once per dtype, on first use, at
    run time (never decided by the build machine); the choice is logged once at DEBUG."""
    ok, why = _probe_mkldnn_linear(dtype)
    log.debug(
        "linear %s on CPU (capability %s): small batches use %s",
        str(dtype).removeprefix("torch."),
        _cpu_capability(),
        why if ok else f"torch.ops.bert_fast.linear ({why})",
    )
    return ok


@functools.cache
def _sgemm_available() -> bool:
    """Our packed-weight SGEMM runs on this CPU (AVX2 + FMA, asked of the extension at run time) and is
    not switched off (``BERT_FAST_SGEMM=0``); decided once, logged once at DEBUG."""
    if os.environ.get("BERT_FAST_SGEMM", "1").strip() == "0":
        ok, why = False, "switched off by BERT_FAST_SGEMM=0"
    elif not hasattr(torch.ops.bert_fast, "sgemm_available"):
        ok, why = False, "the extension predates it"
    else:
        ok = bool(torch.ops.bert_fast.sgemm_available())
        why = "AVX2 + FMA" if ok else "no AVX2 + FMA on this CPU"
    log.debug(
        "linear float32 on CPU: packed-weight SGEMM up to %d rows %s (%s)",
        SGEMM_MAX_ROWS,
        "used" if ok else "not used",
        why,
    )
    return ok


def sgemm_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K) fp32 packed into 16-column panels for ``torch.ops.bert_fast.sgemm_packed_linear``
    (a flat fp32 tensor of ``ceil(N / 16) * 16 * K`` values; the caller caches it)."""
    return torch.ops.bert_fast.sgemm_pack(weight)


def _sgemm_pack_fake(weight):
    """Fake (meta) implementation of ``bert_fast::sgemm_pack``."""
    return weight.new_empty((-(-weight.shape[0] // 16) * 16 * weight.shape[1],))


def _sgemm_packed_linear_fake(x, packed, n, k, bias=None):
    """Fake (meta) implementation of ``bert_fast::sgemm_packed_linear``."""
    return x.new_empty((*x.shape[:-1], n))


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (an opaque tensor for :func:`linear`).

    Raises ``RuntimeError`` from oneDNN where this CPU cannot reorder ``weight.dtype`` (bf16/fp16
    without AVX-512 or AVX-NE-CONVERT); :func:`linear` asks for a packed weight only where the
    run-time probe found the path usable.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _linear_fake(x, weight, bias=None):
    """Fake (meta) implementation of ``bert_fast::linear``."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Callable[[], torch.Tensor] | None
) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Traced: the compiler's own GEMM (Inductor picks or prepacks it, e.g. with freezing); an opaque
        # oneDNN-prepacked weight and the run-time probe have no place inside a graph.
        return F.linear(x, weight, bias)
    sgemm = getattr(packed, "sgemm", None)
    if (
        sgemm is not None
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] <= SGEMM_MAX_ROWS
        and _sgemm_available()
    ):
        return torch.ops.bert_fast.sgemm_packed_linear(x, sgemm(), weight.shape[0], weight.shape[1], bias)
    if packed is not None and x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS and _mkldnn_linear_available(x.dtype):
        rows = x.shape[0]
        padded = _packed_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed(), bias, "none", [], "")
        x = torch.cat((x, x.new_zeros((padded - rows, x.shape[1]))))
        return torch.ops.mkldnn._linear_pointwise(x, packed(), bias, "none", [], "")[:rows]
    return torch.ops.bert_fast.linear(x, weight, bias)


@functools.cache
def _cuda_linear_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("bert_fast::linear", "CUDA")


def _linear_cpp_cuda(x, weight, bias, packed):
    if _cuda_linear_registered():
        return torch.ops.bert_fast.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_torch(x, weight, bias, packed=None):
    return F.linear(x, weight, bias)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    packed: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias``. ``packed``: returns :func:`prepack_weight` of ``weight`` (cached by
    the caller); called only when the small-batch prepacked path is taken. Where ``packed`` also has a
    method ``sgemm()`` returning :func:`sgemm_pack_weight` of ``weight`` (cached by the caller, as
    ``bert_fast``'s model does), fp32 batches up to :data:`SGEMM_MAX_ROWS` rows use our SGEMM."""
    if x.shape[-1] != weight.shape[-1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(
            f"linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)} do not match (x: (..., K), weight: (N, K), bias: (N,))"
        )
    return OP(backend, x, weight, bias, packed)


_dispatch.register_cpp_fake("linear", _linear_fake)
_dispatch.register_cpp_fake("sgemm_pack", _sgemm_pack_fake)
_dispatch.register_cpp_fake("sgemm_packed_linear", _sgemm_packed_linear_fake)

OP = _dispatch.Op(
    "linear",
    _linear_torch,
    {"triton": _linear_torch, "cpp": {"cpu": _linear_cpu, "cuda": _linear_cpp_cuda}},
    supports={"cpp": _dispatch.fused_dtypes},
    grad_args=(0, 1, 2),
    grad="ref",
)
