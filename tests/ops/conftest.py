"""The ``backend`` and ``device`` fixtures of the op tests.

A test module sets ``OP`` (the ``torch.ops.bert_fast`` name its ``cpp`` cases need a kernel for)
and, unless it is every backend (``_check.BACKENDS``), ``OP_BACKENDS`` (the backends its tests are
parametrized over); a test may narrow that with
``@pytest.mark.backends("triton", "cpp")``. Cases a backend cannot run here are skipped with the
reason (``_check.backend_skip_reason``): cpp without the extension, triton without CUDA or the
interpreter, bf16 under the interpreter.

Devices: ``gpu``-marked cases run on CUDA; otherwise ``triton`` runs where the Triton kernels run
(the GPU when there is one, else the interpreter on CPU), ``cpp`` and ``torch`` on CPU.
"""

from __future__ import annotations

import pytest
import torch
from _check import BACKENDS, DEVICE, backend_skip_reason, poisoned


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker is not None else getattr(metafunc.module, "OP_BACKENDS", BACKENDS)
    metafunc.parametrize("backend", list(names), indirect=True)


def _case_device(request, backend: str) -> str:
    if request.node.get_closest_marker("gpu") is not None:
        return "cuda"
    return DEVICE if backend == "triton" else "cpu"


@pytest.fixture
def backend(request) -> str:
    name = request.param
    params = getattr(request.node, "callspec", None)
    dtype = params.params.get("dtype") if params is not None else None
    reason = backend_skip_reason(
        name,
        dtype if isinstance(dtype, torch.dtype) else None,
        _case_device(request, name),
        op=getattr(request.module, "OP", None),
    )
    if reason is not None:
        pytest.skip(reason)
    return name


@pytest.fixture
def device(request, backend) -> str:
    return _case_device(request, backend)


@pytest.fixture
def poison():
    """NaN-fill uninitialized memory for the test (``_check.poisoned``); op modules opt in."""
    with poisoned():
        yield
