"""The peer engines of the benchmark (OpenVINO, inductor freezing) give HF's outputs on ``tiny``.

Skipped when the engine is not installed. fp32 against HF fp32 eager, valid tokens only
(tolerance table: whole models).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_MODEL_ATOL

from bert_fast import bench

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    base, _, _ = bench.load_base_model("tiny", CPU, seed=0)
    return base


def _batches():
    # Two shapes: the engines must take new (batch, sequence) sizes without a rebuild.
    return [bench.make_workload("mixed", 8, 128, 30522, 0, CPU).batches[0],
            bench.make_workload("varlen", 3, 24, 30522, 1, CPU).batches[0]]  # fmt: skip


def _check(prov, base, shapes=2):
    assert prov.error is None and prov.unavailable is None, prov.error or prov.unavailable
    with torch.inference_mode():
        for batch in _batches()[:shapes]:
            ref = base(**batch.kwargs()).last_hidden_state
            out = prov.bind(batch)()
            assert out.shape == ref.shape
            err = (out.float()[batch.valid] - ref[batch.valid]).abs().max().item()
            assert err <= FP32_MODEL_ATOL, f"{prov.name}: max abs error {err:.2e} on {tuple(ref.shape)}"


def test_openvino_matches_hf(tiny):
    pytest.importorskip("openvino")
    ctx = bench.Context(tiny, tiny, CPU, "fp32", threads=torch.get_num_threads())
    prov = bench.build_provider("openvino", ctx)
    _check(prov, tiny)
    assert prov.compile_s is not None and prov.compile_s > 0
    assert "INFERENCE_PRECISION_HINT f32" in prov.notes and prov.external_memory
    # bf16: runs where the CPU plugin supports it, else says why (never silently f32).
    caps = ctx.cache["openvino-core"].get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    bf16 = bench.build_provider("openvino", bench.Context(tiny, tiny, CPU, "bf16", cache=ctx.cache))
    if "BF16" in caps:
        assert bf16.error is None and bf16.unavailable is None
    else:
        assert bf16.unavailable and "BF16" in bf16.unavailable


def test_compile_freezing_matches_hf(tiny):
    ctx = bench.Context(tiny, tiny, CPU, "fp32", compile_dynamic="false")
    prov = bench.build_provider("hf-compile-freezing", ctx)
    assert "freezing" in prov.notes
    _check(prov, tiny, shapes=1)  # one compile: a new shape recompiles (dynamic=False)
