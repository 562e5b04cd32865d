"""Smoke tests of the benchmark CLI (``python -m bert_fast bench`` / ``plot``): outputs and schema.

No timing thresholds: these check that the tool runs, reports every provider it was asked for
with a valid status, and writes JSON, CSV and charts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from bert_fast import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import onnxruntime  # noqa: F401

    HAS_ORT = True
except ImportError:
    HAS_ORT = False

NUMERIC_OK = ("latency_ms_median", "latency_ms_p90", "latency_ms_min", "seqs_per_s", "tokens_per_s", "flops")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The CLI runs as users run it: not under the Triton interpreter that tests/conftest.py enables.
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_records(results: dict, providers: list[str]) -> None:
    assert results["schema"] == bench.SCHEMA_VERSION
    for key in ("torch", "transformers", "bert_fast", "onnxruntime", "device_name", "cpu_model", "threads",
                "git_revision", "command", "peak_memory_method", "wall_s"):
        assert key in results["meta"], key
    assert results["settings"]["providers"] == providers
    records = results["records"]
    assert {r["provider"] for r in records} == set(providers)
    for r in records:
        missing = [k for k in bench.RECORD_KEYS if k not in r]
        assert not missing, f"record lacks {missing}"
        assert r["status"] in bench.STATUSES, r["status"]
        if r["status"] == "ok":
            for k in NUMERIC_OK:
                assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (r["provider"], k, r[k])
            assert len(r["latencies_ms"]) == r["repeats"]
            assert r["latency_ms_p90"] >= r["latency_ms_median"] >= r["latency_ms_min"]
            if r["provider"] != "linear-floor":
                assert math.isfinite(r["max_abs_err"]) and r["max_abs_err"] < 1e-3, (r["provider"], r["max_abs_err"])
            if r["peak_mem_mb"] is not None:
                assert math.isfinite(r["peak_mem_mb"]) and r["peak_mem_mb"] >= 0
        else:
            assert r["reason"], f"{r['provider']}: status {r['status']} without a reason"
        assert 0.0 <= r["padding_fraction"] < 1.0
        assert sum(r["lengths"]) == r["real_tokens"] and len(r["lengths"]) == r["batch"]


def test_bench_and_plot_cli(tmp_path):
    providers = ["bert_fast", "bert_fast-triton", "hf-eager", "hf-sdpa", "linear-floor"]
    if HAS_ORT:
        providers.append("onnxruntime")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bert_fast", "bench", "--model", "tiny", "--device", "cpu", "--dtypes", "fp32",
        "--batch-sizes", "2", "--seq-lens", "16", "--profiles", "fixed,varlen", "--repeats", "1", "--warmup", "1",
        "--providers", ",".join(providers), "--out", str(out), "--no-progress", "--no-plot",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hf-sdpa" in proc.stdout and "median ms" in proc.stdout  # the printed table

    results = json.loads((out / "results.json").read_text())
    _check_records(results, providers)
    by_provider = {(r["provider"], r["profile"]): r for r in results["records"]}
    assert len(by_provider) == len(providers) * 2
    for profile in ("fixed", "varlen"):
        # Triton needs CUDA: on CPU it is reported, not dropped.
        assert by_provider[("bert_fast-triton", profile)]["status"] == "unavailable"
        assert by_provider[("hf-sdpa", profile)]["speedup_vs_hf_sdpa"] == pytest.approx(1.0)
        for p in ("bert_fast", "hf-eager", "hf-sdpa") + (("onnxruntime",) if HAS_ORT else ()):
            assert by_provider[(p, profile)]["status"] == "ok", by_provider[(p, profile)]["reason"]
    assert by_provider[("hf-sdpa", "fixed")]["padding_fraction"] == 0.0
    assert by_provider[("hf-sdpa", "varlen")]["padding_fraction"] > 0.0

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["records"])
    assert set(bench.CSV_COLUMNS) <= set(rows[0])

    plots = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, "-m", "bert_fast", "plot", str(out / "results.json"), "-o", str(plots)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert "latency_tiny_fp32.png" in pngs and "speedup_tiny.png" in pngs, pngs
    assert "throughput_tiny_fp32.png" in pngs, pngs  # one sequence length: the per-cell variant
    for name in pngs:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_provider_is_reported_and_run_continues(monkeypatch):
    def broken(ctx):
        raise RuntimeError("deliberately broken for the test")

    monkeypatch.setitem(bench.REGISTRY, "hf-eager", bench.providers.ProviderSpec("hf-eager", broken, "broken"))
    settings = bench.Settings(
        models=["tiny"], device="cpu", dtypes=["fp32"], batch_sizes=[2], seq_lens=[8], profiles=["varlen"],
        providers=["hf-eager", "hf-sdpa", "bert_fast-torch"], repeats=1, warmup=0,
    )  # fmt: skip
    results = bench.run(settings, progress=False)
    status = {r["provider"]: r for r in results["records"]}
    assert status["hf-eager"]["status"] == "error"
    assert "deliberately broken" in status["hf-eager"]["reason"]
    assert status["hf-sdpa"]["status"] == "ok" and status["bert_fast-torch"]["status"] == "ok"
    assert "hf-sdpa" in bench.format_table(results)


def test_workload_profiles():
    assert bench.profile_lengths("fixed", 3, 10, 0) == [10, 10, 10]
    assert bench.profile_lengths("mixed", 99, 999, 0) == list(bench.MIXED_LENGTHS)
    lengths = bench.profile_lengths("varlen", 16, 64, 0)
    assert max(lengths) == 64 and min(lengths) >= 8 and len(lengths) == 16
    assert lengths == bench.profile_lengths("varlen", 16, 64, 0)  # seeded
    w = bench.make_workload("mixed", 1, 1, 100, 0, bench.pick_device("cpu"), 0.125)
    assert (w.batch, w.seq_len) == (8, 128)
    assert round(w.padding_fraction, 2) == 0.49
