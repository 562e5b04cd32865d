"""The CUDA half of the extension, checked on a machine without a GPU or a CUDA build of torch.

* Every kernel source (csrc/cuda/*.cu, torch-free by design) compiles with nvcc for Ampere and
  Hopper without register spills.
* The glue (csrc/cuda/*.cpp) and csrc/ops.cpp compile with ``-DWITH_CUDA`` against this torch's
  headers. A CPU-only torch ships the c10/cuda and ATen/cuda headers but not the generated
  ``c10/cuda/impl/cuda_cmake_macros.h``; the test writes that one-line header (what a CUDA build of
  torch generates) into a temporary include directory. Objects are compiled, not linked (a CPU
  torch has no libc10_cuda / libtorch_cuda to link against); every launcher the glue calls must be
  defined by one of the kernel objects.
* Static, from the sources: every op has a schema, a CPU and a CUDA registration in csrc/ops.cpp,
  and both implementations call the op's validator from csrc/contracts.h. When the extension is
  built, the dispatcher agrees (CPU always, CUDA when it was built WITH_CUDA).

All compiles run in parallel; objects go to a temporary directory.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
GLUE = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))) + [os.path.join(CSRC, "ops.cpp")]
ARCHS = ("sm_80", "sm_90a")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else None


NVCC = _nvcc()


def _cuda_include() -> str | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _run_all(jobs, fn):
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, jobs))


def _defined_symbols(obj: str, undefined: bool) -> set[str]:
    out = subprocess.run(["nm", "-P", obj], capture_output=True, text=True, check=True).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and (parts[1] == "U") == undefined:
            syms.add(parts[0])
    return syms


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory) -> dict[str, str]:
    """Every .cu file compiled for every arch: {"<file> [<arch>]": object path}."""
    if NVCC is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    assert SOURCES, "no csrc/cuda/*.cu sources found"
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(job):
        src, arch = job
        obj = out_dir / f"{os.path.basename(src)}.{arch}.o"
        cmd = [NVCC, "-c", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas=-warn-spills", "-o", str(obj), src]
        return src, arch, str(obj), subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    results = _run_all([(s, a) for s in SOURCES for a in ARCHS], compile_one)
    failures = [f"{os.path.basename(s)} [{a}]:\n{p.stderr}" for s, a, _, p in results if p.returncode != 0]
    assert not failures, "\n".join(failures)
    spills = [f"{os.path.basename(s)} [{a}]: {p.stderr}" for s, a, _, p in results if "spill" in p.stderr.lower()]
    assert not spills, "register spills:\n" + "\n".join(spills)
    return {f"{os.path.basename(s)} [{a}]": o for s, a, o, _ in results}


def test_cuda_sources_compile(kernel_objects):
    assert len(kernel_objects) == len(SOURCES) * len(ARCHS)


def _glue_flags(tmp_path) -> list[str]:
    from torch.utils import cpp_extension

    torch_includes = cpp_extension.include_paths()
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("the CUDA toolkit's headers (cuda_runtime.h) are not found")
    shim = tmp_path / "shim"
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in torch_includes):
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
        )
    includes = [str(shim), *torch_includes, sysconfig.get_paths()["include"], cuda_inc, CSRC]
    return ["-std=c++20", "-O0", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"] + [
        f"-I{d}" for d in includes
    ]


@pytest.mark.skipif(shutil.which("c++") is None or shutil.which("nm") is None, reason="needs a C++ compiler and nm")
def test_cuda_glue_compiles_against_torch_headers(kernel_objects, tmp_path):
    """The WITH_CUDA glue and registration compile, and every launcher they call is defined."""
    flags = _glue_flags(tmp_path)

    def compile_one(src):
        obj = tmp_path / (os.path.basename(src) + ".o")
        proc = subprocess.run(["c++", "-c", *flags, "-o", str(obj), src], capture_output=True, text=True, timeout=600)
        return src, str(obj), proc

    results = _run_all(GLUE, compile_one)
    failures = [f"{os.path.basename(s)}:\n{p.stderr[-4000:]}" for s, _, p in results if p.returncode != 0]
    assert not failures, "\n".join(failures)
    called = set()
    for _, obj, _ in results:
        called |= {s for s in _defined_symbols(obj, undefined=True) if s.startswith("bf_")}
    assert called, "the glue calls no bf_* launcher: is the WITH_CUDA part compiled at all?"
    for arch in ARCHS:
        defined = set()
        for name, obj in kernel_objects.items():
            if name.endswith(f"[{arch}]"):
                defined |= _defined_symbols(obj, undefined=False)
        missing = called - defined
        assert not missing, f"launchers called by the glue but defined by no .cu file [{arch}]: {missing}"


# --- registration and validators, from the sources ------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _registered_ops(ops_cpp: str) -> set[str]:
    """The ops of the registration list (BERT_FAST_REGISTER_OPS) in csrc/ops.cpp."""
    m = re.search(r"#define BERT_FAST_REGISTER_OPS\(DEV\)(.*?)\n\n", ops_cpp, re.S)
    assert m, "no BERT_FAST_REGISTER_OPS list in csrc/ops.cpp"
    names = re.findall(r'm\.impl\("(\w+)",\s*&(\w+)##DEV\)', m.group(1))
    for op, fn in names:
        assert fn == f"{op}_", f"the registration of {op} points at {fn}<device>"
    return {op for op, _ in names}


def _function_body(sources: dict[str, str], name: str) -> str:
    """The body of the definition of `name` (returning a type, at namespace level) in one of sources."""
    pattern = re.compile(r"^[\w:<>, ]+\b" + name + r"\(.*?\)\s*\{\n(.*?)^\}", re.S | re.M)
    found = [m.group(1) for text in sources.values() for m in pattern.finditer(text)]
    assert len(found) == 1, f"expected one definition of {name}, found {len(found)}"
    return found[0]


def _schemas() -> set[str]:
    # The backward ops (``*_bwd``) and the fused-dropout forwards (``*_dropout``) are CPU-only (on the GPU
    # they are Triton's), and so is the packed-weight SGEMM (``sgemm_*``, AVX2): not in the two-device list.
    names = re.findall(r'm\.def\(\s*"(\w+)\(', _read(os.path.join(CSRC, "ops.cpp")))
    return {n for n in names if not n.endswith(("_bwd", "_dropout")) and not n.startswith("sgemm_")}


def test_every_op_is_registered_for_cpu_and_cuda():
    ops_cpp = _read(os.path.join(CSRC, "ops.cpp"))
    schemas = _schemas()
    assert len(schemas) == 8, schemas
    assert _registered_ops(ops_cpp) == schemas
    cpu = re.search(r"TORCH_LIBRARY_IMPL\(bert_fast, CPU, m\) \{ BERT_FAST_REGISTER_OPS\(cpu\) \}", ops_cpp)
    cuda = re.search(
        r"#ifdef WITH_CUDA\s+TORCH_LIBRARY_IMPL\(bert_fast, CUDA, m\) \{ BERT_FAST_REGISTER_OPS\(cuda\) \}\s+#endif",
        ops_cpp,
    )
    assert cpu, "the CPU registration must use the one op list"
    assert cuda, "the CUDA registration must use the one op list, under WITH_CUDA"


def test_both_implementations_call_the_ops_validator():
    cpu_src = {p: _read(p) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))}
    cuda_src = {p: _read(p) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))}
    contracts = _read(os.path.join(CSRC, "contracts.h"))
    for op in sorted(_schemas()):
        assert re.search(r"\bcheck_" + op + r"\(", contracts), f"csrc/contracts.h has no check_{op}"
        for suffix, sources in (("cpu", cpu_src), ("cuda", cuda_src)):
            body = _function_body(sources, f"{op}_{suffix}")
            assert re.search(r"\bcheck_" + op + r"\(", body), f"{op}_{suffix} does not call check_{op}"


def test_activation_codes_defined_once():
    """One enum (csrc/activation.h) for CPU, CUDA and the glue; the integers Python uses."""
    header = _read(os.path.join(CSRC, "activation.h"))
    codes = dict(re.findall(r"BF_ACT_(\w+) = (\d+)", header))
    assert codes == {"GELU": "0", "GELU_TANH": "1", "RELU": "2"}
    others = [p for p in glob.glob(os.path.join(CSRC, "**", "*.*"), recursive=True) if not p.endswith("activation.h")]
    for path in others:
        text = _read(path)
        assert not re.search(r"BF_ACT_\w+\s*=", text), f"{path} defines activation codes again"
        assert "enum class Activation" not in text, f"{path} defines activation codes again"


def test_dispatcher_registrations_match_the_build():
    try:
        ext = importlib.import_module("bert_fast._C")
    except ImportError as exc:
        pytest.skip(f"bert_fast._C is not built: {exc}")
    for op in sorted(_schemas()):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bert_fast::{op}", "CPU"), op
        if ext.WITH_CUDA:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bert_fast::{op}", "CUDA"), op
