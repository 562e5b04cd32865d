"""Every CUDA source of the extension (csrc/cuda/*.cu) compiles with nvcc for Ampere and Hopper.

The .cu files include no torch headers (their C launchers are wrapped by csrc/cuda_ops.cpp), so
this check needs only the CUDA toolkit, not a GPU or a CUDA build of torch. All compiles run in
parallel; objects go to a temporary directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("sm_80", "sm_90a")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else None


NVCC = _nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_cuda_sources_compile(tmp_path):
    assert SOURCES, "no csrc/cuda/*.cu sources found"

    def compile_one(job):
        src, arch = job
        obj = tmp_path / f"{os.path.basename(src)}.{arch}.o"
        cmd = [NVCC, "-c", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas=-warn-spills", "-o", str(obj), src]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return src, arch, proc

    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, jobs))
    failures = [f"{os.path.basename(s)} [{a}]:\n{p.stderr}" for s, a, p in results if p.returncode != 0]
    assert not failures, "\n".join(failures)
    spills = [f"{os.path.basename(s)} [{a}]: {p.stderr}" for s, a, p in results if "spill" in p.stderr.lower()]
    assert not spills, "register spills:\n" + "\n".join(spills)
