"""The machine and software a benchmark ran on, recorded with every result.

Nothing here runs at import time; the CUDA probes run only for a CUDA device.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import torch

#: CPU instruction-set flags that decide which GEMM and attention kernels a CPU engine can use
#: (``/proc/cpuinfo`` names): AVX2/AVX-512 width, bf16 dot products, AMX tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")  # fmt: skip


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; otherwise ``torch.device(name)``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in out:
                    out[key] = value.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU has (empty off Linux)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in flags]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_revision() -> str | None:
    """``HEAD`` of the checkout this package runs from (``-dirty`` if modified), or ``None``."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def version(module: str) -> str | None:
    """``module.__version__`` if it imports, else ``None``."""
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(mod, "__version__", None)


def command_line() -> str | None:
    if not sys.argv:
        return None
    prog = os.path.basename(sys.argv[0])
    if prog == "__main__.py":  # python -m bert_fast
        prog = "python -m bert_fast"
    return shlex.join([prog, *sys.argv[1:]])


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, machine and load: the ``meta`` of a results file."""
    import transformers

    import bert_fast

    try:
        from bert_fast import _C as ext
    except Exception:  # noqa: BLE001 - not built, or built for another CPU
        ext = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bert_fast": bert_fast.__version__,
        "onnxruntime": version("onnxruntime"),
        "openvino": version("openvino"),
        "triton": version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cpp_extension": ext is not None,
        "cpp_extension_isa": getattr(ext, "CPU_ISA", None) if ext is not None else None,
        "git_revision": git_revision(),
        "command": command_line(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Other processes' load explains noisy timings on a shared machine: record it.
        "loadavg_start": loadavg(),
    }
