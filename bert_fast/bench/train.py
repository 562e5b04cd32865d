"""``bert-fast bench --mode train``: one optimizer step (forward, backward, AdamW), side by side.

Cells: task (``mlm``: ``BertForMaskedLM`` with 15% of the valid tokens labelled; ``cls``:
``BertForSequenceClassification``, 2 labels) x dtype (``fp32``; ``bf16``: autocast around the
forward, fp32 weights and optimizer) x lengths (``fixed``: every row ``seq_len`` tokens; ``mixed``:
row lengths uniform in [1, seq_len], about half of the padded batch is padding) x provider:

* ``hf_sdpa``: transformers' own class, ``attn_implementation="sdpa"``, padded batch;
* ``bert_fast``: the drop-in class, same padded batch (padding skipped inside the model);
* ``bert_fast_sparse`` (MLM only): the drop-in class with ``sparse_prediction=True`` (the MLM head
  and its loss only on labelled positions);
* ``hf_compile``: ``torch.compile`` (Inductor, default mode) of the ``hf_sdpa`` model, forward and
  backward compiled; the compile happens in the warm-up steps and is reported apart
  (``first_step_s``). Not in the default list (minutes of compilation on a small CPU): name it
  with ``--providers``.

The optimizer is ``torch.optim.AdamW(fused=True)`` for every provider: what HF ``Trainer`` runs
by default with torch >= 2.8 (``optim="adamw_torch_fused"``); the loop over parameters of the
unfused default spends about as long as a BERT-base forward's LayerNorms and GELUs together.

All providers of a cell start from the same random weights and get the same batch. Each cell runs
in a fresh Python process (``python -m bert_fast.bench.train --cell ...``), so that its peak
resident memory (``ru_maxrss``) is its own: reported as the peak over the process and as the growth
during the steps over the resident size after the model and optimizer were built. Times: the median
of ``repeats`` steps after ``warmup`` steps; ratios are measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

PRESET_CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "mini": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}
TASKS = ("mlm", "cls")
PROVIDERS = ("hf_sdpa", "bert_fast", "bert_fast_sparse")
ALL_PROVIDERS = (*PROVIDERS, "hf_compile")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return float("nan")


def _batch(task: str, lengths: str, batch_size: int, seq_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
    if lengths == "fixed":
        lens = torch.full((batch_size,), seq_len)
    else:
        lens = torch.randint(1, seq_len + 1, (batch_size,), generator=g)
        lens[0] = seq_len  # the padded length is seq_len
    mask = (torch.arange(seq_len)[None, :] < lens[:, None]).long()
    if task == "mlm":
        chosen = (torch.rand((batch_size, seq_len), generator=g) < 0.15) & mask.bool()
        chosen[:, 0] |= True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    else:
        labels = torch.randint(0, 2, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum())


def _model(task: str, provider: str, model: str, seed: int):
    import transformers

    import bert_fast

    config = transformers.BertConfig(**PRESET_CONFIGS[model], num_labels=2)
    torch.manual_seed(seed)
    if provider in ("hf_sdpa", "hf_compile"):
        cls = transformers.BertForMaskedLM if task == "mlm" else transformers.BertForSequenceClassification
        return cls._from_config(config, attn_implementation="sdpa")
    if task == "mlm":
        return bert_fast.BertForMaskedLM(config, sparse_prediction=provider == "bert_fast_sparse")
    return bert_fast.BertForSequenceClassification(config)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One (task, dtype, lengths, provider) cell in this process: step times and memory."""
    if cell.get("threads"):
        torch.set_num_threads(int(cell["threads"]))
    model = _model(cell["task"], cell["provider"], cell["model"], cell["seed"]).train()
    compile_backend = cell.get("compile_backend", "inductor")  # tests use aot_eager (no code generation)
    step_model = torch.compile(model, backend=compile_backend) if cell["provider"] == "hf_compile" else model
    batch, tokens = _batch(cell["task"], cell["lengths"], cell["batch_size"], cell["seq_len"], 30522, cell["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # HF Trainer's default optimizer
    bf16 = cell["dtype"] == "bf16"
    times = []
    rss_setup = None
    for i in range(cell["warmup"] + cell["repeats"]):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if rss_setup is None:
            rss_setup = _current_rss_mib()  # weights, grads and optimizer state exist after step 1
            first_step = dt
        if i >= cell["warmup"]:
            times.append(dt)
    return {
        **cell,
        "median_s": statistics.median(times),
        "times_s": times,
        "first_step_s": first_step,
        "valid_tokens": tokens,
        "tokens_per_s": tokens / statistics.median(times),
        "peak_rss_mib": _rss_mib(),
        "rss_after_first_step_mib": rss_setup,
        "loss": float(loss.detach()),
        "optimizer": "AdamW(fused=True)",
    }


def run(
    model: str = "base",
    tasks: tuple[str, ...] = ("mlm",),
    dtypes: tuple[str, ...] = ("fp32",),
    lengths: tuple[str, ...] = ("mixed", "fixed"),
    providers: tuple[str, ...] = PROVIDERS,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Every cell in its own process; returns ``{"environment", "settings", "cells"}``."""
    from .env import environment

    cells = []
    for task in tasks:
        for dtype in dtypes:
            for ln in lengths:
                for provider in providers:
                    if provider == "bert_fast_sparse" and task != "mlm":
                        continue
                    cell = dict(task=task, dtype=dtype, lengths=ln, provider=provider, model=model,
                                batch_size=batch_size, seq_len=seq_len, repeats=repeats, warmup=warmup, seed=seed,
                                threads=threads)  # fmt: skip
                    proc = subprocess.run(
                        [sys.executable, "-m", "bert_fast.bench.train", "--cell", json.dumps(cell)],
                        capture_output=True, text=True,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        result = {**cell, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
                    else:
                        result = json.loads(proc.stdout.strip().splitlines()[-1])
                    cells.append(result)
                    log(format_cell(result))
    settings = dict(model=model, batch_size=batch_size, seq_len=seq_len, repeats=repeats, warmup=warmup, seed=seed,
                    threads=threads or torch.get_num_threads())  # fmt: skip
    return {"mode": "train", "environment": environment(torch.device("cpu")), "settings": settings, "cells": cells}


def format_cell(r: dict[str, Any]) -> str:
    head = f"{r['task']:4s} {r['dtype']:5s} {r['lengths']:6s} {r['provider']:17s}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    return (f"{head} step {r['median_s'] * 1e3:9.1f} ms  {r['tokens_per_s']:8.0f} tok/s  "
            f"peak RSS {r['peak_rss_mib']:7.0f} MiB")  # fmt: skip


def ratio_table(result: dict[str, Any]) -> str:
    """Speed-up over hf_sdpa (median step time) and peak-RSS ratio, per cell."""
    by = {(c["task"], c["dtype"], c["lengths"], c["provider"]): c for c in result["cells"] if "error" not in c}
    lines = ["task dtype lengths provider           speedup_vs_hf_sdpa  peak_rss_vs_hf"]
    for (task, dtype, ln, prov), c in by.items():
        base = by.get((task, dtype, ln, "hf_sdpa"))
        if prov == "hf_sdpa" or base is None:
            continue
        lines.append(f"{task:4s} {dtype:5s} {ln:7s} {prov:18s} {base['median_s'] / c['median_s']:18.2f}x "
                     f"{c['peak_rss_mib'] / base['peak_rss_mib']:14.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bert_fast.bench.train")
    p.add_argument("--cell", required=True, help="JSON of one cell (internal: run by `bert-fast bench --mode train`)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(json.dumps(run_cell(json.loads(args.cell))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
