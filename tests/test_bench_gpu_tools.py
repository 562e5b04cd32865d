"""The GPU-check tools, checked without a GPU: the summary reader, the ceilings timer, the script's guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import ceilings, gpu_summary  # noqa: E402


def _rec(provider, median, status="ok", mfu=None, err=None, profile="fixed", batch=32, seq_len=128):
    return dict(model="base", dtype="bf16", batch=batch, seq_len=seq_len, profile=profile, padding_fraction=0.0,
                provider=provider, status=status, latency_ms_median=median, mfu=mfu, max_abs_err=err,
                reason=None if status == "ok" else "why")  # fmt: skip


def test_gpu_summary_reads_partial_results(tmp_path, capsys):
    records = [_rec("bert_fast", 5.0, mfu=0.4, err=0.03), _rec("hf-sdpa", 10.0), _rec("hf-sdpa-compile", 6.0),
               _rec("bert_fast-cpp", 8.0, status="error")]  # fmt: skip
    meta = {"device_name": "Test GPU", "torch": "t", "partial": True}
    (tmp_path / "headline_base.json").write_text(json.dumps({"meta": meta, "records": records}))
    (tmp_path / "pytest_quick.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    (tmp_path / "ceilings.json").write_text(json.dumps({"copy_GBps": 3000, "gemm_TFLOPs": {"bf16": {"a": 700.0}}}))
    assert gpu_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Test GPU" in out
    row = next(line for line in out.splitlines() if "| bert_fast |" in line)
    assert "[partial run]" in row and "40.0%" in row and "2.00x" in row and "1.20x" in row and "3.0e-02" in row
    assert "| bert_fast-cpp | error: why" in out
    assert "7 passed, 1 failed, 0 errors, 2 skipped" in out and "full tier (-m gpu): not run" in out
    assert "bf16 700.0" in out


def test_gpu_summary_without_results(tmp_path, capsys):
    assert gpu_summary.main([str(tmp_path)]) == 0
    assert "no benchmark results found" in capsys.readouterr().out


def test_ceilings_time_many_calls_per_sample():
    calls = []
    t, per_sample = ceilings.time_per_call(lambda: calls.append(1), torch.device("cpu"), repeats=3, sample_s=0.01)
    assert per_sample > 1 and t > 0
    assert len(calls) == 2 + 1 + 3 * per_sample  # warmup, the sizing call, the samples
    _, single = ceilings.time_per_call(lambda: None, torch.device("cpu"), repeats=2, sample_s=0.0)
    assert single == 1


def test_ceilings_cli_writes_json(tmp_path):
    out = tmp_path / "c.json"
    assert ceilings.main(["--device", "cpu", "--dtypes", "fp32", "--square", "64", "--copy-mb", "1",
                          "--repeats", "2", "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["partial"] is False and data["copy_GBps"] > 0
    assert set(data["gemm_TFLOPs"]["fp32"]) == {"square_64", "ffn_up_524x768x3072"}
    assert data["floor_ms"]["fp32"]["bound"] in ("compute", "memory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_script_refuses_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TOTAL_S="30")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no python with a CUDA torch" in proc.stderr
    assert not (tmp_path / ".venv").exists()
