"""Timing, peak memory and the FLOP-rate ceiling of a device.

* Timing: CPU calls are synchronous and timed with ``time.perf_counter``; CUDA calls with a pair
  of CUDA events around the call.
* Peak memory of one call:

  - CUDA: ``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it
    (weights and inputs excluded: the working memory of one forward).
  - CPU: growth of the process's peak resident set size during the call. Linux resets the peak
    (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``; before the call, free heap
    memory is handed back to the OS (``malloc_trim``) so that memory freed by earlier calls and
    reused counts again. Everything the process touches is included (oneDNN scratch), memory
    mapped but never touched is not. Unavailable (``None``) off Linux.
  - Engines with their own allocator (ONNX Runtime, OpenVINO): no number (``None``). On CPU they
    keep their working memory in an arena from one run to the next (the growth of RSS reads 0); on
    CUDA they allocate outside PyTorch's allocator.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Peak dense (no sparsity) tensor-core TFLOP/s for fp16/bf16 and non-tensor fp32, from NVIDIA's
#: datasheets, matched as a substring of ``torch.cuda.get_device_name()`` (first match wins).
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0}),
    ("H100", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),
    ("H200", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"fp16": 362.05, "bf16": 362.05, "fp32": 91.6}),
    ("L4", {"fp16": 121.0, "bf16": 121.0, "fp32": 30.3}),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call takes (CUDA events on CUDA, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def cpu_peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


def measure_memory(fn: Callable[[], Any], device: torch.device, external: bool = False) -> tuple[Any, float | None]:
    """Run ``fn`` once; return (its result, peak memory in MiB or ``None``). See the module docstring."""
    gc.collect()
    if external:  # memory held or allocated where these probes cannot see it
        out = fn()
        sync(device)
        return out, None
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not cpu_peak_rss_supported():
        return fn(), None
    _malloc_trim()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _read_status_kb("VmRSS")
    out = fn()
    peak = _read_status_kb("VmHWM")
    if before is None or peak is None:
        return out, None
    return out, max(0, peak - before) / 1024


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gpu_peak_tflops(name: str, dtype: str, override: float | None) -> tuple[float | None, str | None]:
    """(peak dense TFLOP/s of GPU ``name`` in ``dtype``, where that number comes from)."""
    if override is not None:
        return override, "--peak-tflops"
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(dtype), f"NVIDIA datasheet, {key}, dense {dtype}"
    return None, None
