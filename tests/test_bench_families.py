"""The benchmark on BERT-family checkpoints other than BERT: ``bench --model DIR`` for DistilBERT (no token
types, its own module names, no pooler) and RoBERTa (positions after the padding index).

One CLI run over both tiny checkpoint directories (random weights, saved with ``save_pretrained``; no
download): every provider reports ``ok`` with its output within fp32 tolerance of HF's, or
``unavailable`` with a reason; none errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import torch
import transformers

from bert_fast import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Every CPU-capable provider but the torch.compile ones (each compile costs tens of seconds here).
PROVIDERS = [
    "bert_fast", "bert_fast-triton", "bert_fast-cpp", "bert_fast-torch", "bert_fast-graphs", "hf-eager", "hf-sdpa",
    "onnxruntime", "openvino", "linear-floor",
]  # fmt: skip
#: Unavailable on a CPU whatever is installed.
CUDA_ONLY = {"bert_fast-triton", "bert_fast-graphs"}
#: Must run whenever their package is present.
MUST_RUN = {"bert_fast", "bert_fast-torch", "hf-eager", "hf-sdpa", "linear-floor"}
OPTIONAL_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
FP32_ATOL = 1e-4


def _save_tiny(tmp_path, name: str) -> str:
    torch.manual_seed(0)
    if name == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=101, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64
        )
        model = transformers.DistilBertModel(config)
    else:
        config = transformers.RobertaConfig(
            vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
        )  # fmt: skip
        model = transformers.RobertaModel(config)
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI as users run it
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_bench_cli_distilbert_and_roberta_dirs(tmp_path):
    models = [_save_tiny(tmp_path, "distilbert"), _save_tiny(tmp_path, "roberta")]
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bert_fast", "bench", "--model", ",".join(models), "--device", "cpu", "--dtypes", "fp32",
        "--batch-sizes", "2", "--seq-lens", "16", "--profiles", "varlen", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--providers", ",".join(PROVIDERS), "--out", str(out), "--no-progress", "--no-plot",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = json.loads((out / "results.json").read_text())["records"]
    seen = {(r["model"], r["provider"], r["profile"]): r for r in records}
    assert len(seen) == len(records) == 2 * len(PROVIDERS)
    for r in records:
        where = (r["model"], r["provider"], r["profile"])
        assert r["status"] in ("ok", "unavailable"), (where, r["status"], r["reason"])
        if r["status"] == "unavailable":
            assert r["reason"], where
        if r["provider"] in CUDA_ONLY:
            assert r["status"] == "unavailable", where
        package = OPTIONAL_PACKAGE.get(r["provider"])
        if r["provider"] in MUST_RUN or (package and importlib.util.find_spec(package)):
            assert r["status"] == "ok", (where, r["reason"])
        if r["status"] == "ok":
            assert math.isfinite(r["latency_ms_median"]) and r["flops"] > 0, where
            if r["provider"] != "linear-floor":
                assert r["max_abs_err"] is not None and r["max_abs_err"] <= FP32_ATOL, (where, r["max_abs_err"])
    # DistilBERT has no pooler: its FLOP count is the layers' alone (linear layers + attention).
    distil = seen[("distilbert", "hf-sdpa", "varlen")]
    assert distil["padding_fraction"] > 0  # padded rows: the masking path is exercised
    h, inter, layers, lengths = 64, 96, 2, distil["lengths"]
    expected = layers * (2.0 * sum(lengths) * (4 * h * h + 2 * h * inter) + 4.0 * h * sum(n * n for n in lengths))
    assert distil["flops"] == expected


def test_workload_without_token_types():
    w = bench.make_workload("varlen", 3, 12, 50, 0, torch.device("cpu"), token_types=False)
    assert set(w.kwargs()) == {"input_ids", "attention_mask"} and w.token_type_ids is None
    w = bench.make_workload("varlen", 3, 12, 50, 0, torch.device("cpu"))
    assert set(w.kwargs()) == {"input_ids", "attention_mask", "token_type_ids"}
