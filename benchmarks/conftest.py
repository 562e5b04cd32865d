"""Fixtures of the per-op micro-benchmarks (``pytest benchmarks/``).

The benchmarks run the ops the way the model runs them: on CUDA when a GPU is present, else on
CPU. Under the Triton interpreter (a CPU test tool) the Triton backend is far too slow to time,
so it is skipped on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"bert_fast micro-benchmarks: device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"
