"""``bert-fast bench --mode train``: every provider runs a real optimizer step and reports it."""

from __future__ import annotations

import json
import math

import pytest

from bert_fast import cli
from bert_fast.bench import train


def test_train_bench_cells_and_ratio_table(tmp_path, monkeypatch):
    # the cells run in child processes: without this, `auto` there would take the Triton interpreter
    # the test session enables on CPU (a minute per step instead of a fraction of a second)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "res"
    rc = cli.main(["bench", "--mode", "train", "--model", "tiny", "--train-lengths", "mixed", "--repeats", "1",
                   "--warmup", "1", "--out", str(out), "--name", "t"])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "t.json").read_text())
    cells = result["cells"]
    assert [c["provider"] for c in cells] == list(train.PROVIDERS)
    for c in cells:
        assert "error" not in c, c
        assert c["median_s"] > 0 and c["tokens_per_s"] > 0 and c["first_step_s"] > 0
        assert math.isfinite(c["loss"]) and c["peak_rss_mib"] > 0
        assert c["valid_tokens"] < c["batch_size"] * c["seq_len"]  # mixed lengths: padding exists
    table = train.ratio_table(result)
    assert "bert_fast_sparse" in table and "hf_sdpa " not in table.splitlines()[1]


def test_train_bench_refuses_unknown_provider(tmp_path):
    with pytest.raises(SystemExit, match="unknown provider"):
        cli.main(["bench", "--mode", "train", "--model", "tiny", "--providers", "bert_fast,nope", "--out",
                  str(tmp_path)])  # fmt: skip


def test_train_cell_hf_compile_compiles_the_step():
    """The hf_compile provider runs the step through torch.compile (aot_eager here: no code generation)."""
    import torch
    from torch._dynamo.utils import counters

    cell = dict(task="cls", dtype="fp32", lengths="fixed", model="tiny", batch_size=2, seq_len=16, repeats=1,
                warmup=1, seed=0, threads=None, provider="hf_compile",
                compile_backend="aot_eager")  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    try:
        result = train.run_cell(cell)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 1, dict(counters["stats"])
    assert result["provider"] == "hf_compile" and result["median_s"] > 0 and math.isfinite(result["loss"])
