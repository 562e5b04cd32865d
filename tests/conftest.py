"""Test configuration.

Without CUDA, the Triton kernels run under the Triton interpreter, which must be switched on
before any module with ``@triton.jit`` is imported (DESIGN.md §4). This file is imported by
pytest before any test module, so it is the place to do it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests pick backends explicitly; a backend forced from the environment would silently change them.
os.environ.pop("BERT_FAST_BACKEND", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer tests (real checkpoints, AOT compiles)")
    config.addinivalue_line(
        "markers",
        "gpu_quick: the quick GPU tier (every op x dtype at BERT-base shapes, few kernel compiles); "
        "`pytest -m gpu_quick`",
    )
    config.addinivalue_line(
        "markers", "backends(*names): the backends an op test is parametrized over (tests/ops/conftest.py)"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or "gpu_quick" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
