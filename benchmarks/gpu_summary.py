"""The short summary at the end of ``make gpu-check``: reads a results folder, prints markdown.

Reads (whatever of them exists; a step that stopped early leaves a partial file or none):
``headline_base.json``, ``headline_large.json``, ``results.json`` (bench runs), ``ceilings.json``,
``pytest_quick.xml`` / ``pytest_gpu.xml`` (JUnit reports of the test tiers).

Prints, for BERT-base bf16 32x128 (fixed and mixed lengths) and BERT-large bf16 8x384: bert_fast's
median latency, MFU (useful FLOPs over the datasheet peak), speed ratio to HF sdpa and to
``torch.compile`` of HF sdpa, measured in the same run, and the max abs error against HF fp32; then
the test counts and the measured GEMM ceilings. Reads data, never measures.

Usage: ``python benchmarks/gpu_summary.py benchmarks/results/<gpu-name>``
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

RUNS = ("headline_base", "headline_large", "results")
OURS = ("bert_fast", "bert_fast-cpp", "bert_fast-graphs")


def _load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _junit(path: str) -> str | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def headline_rows(results: dict, tag: str = "") -> list[str]:
    """One markdown row per (cell, bert_fast provider) of a results file."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results.get("records", []):
        key = (r["model"], r["dtype"], r["batch"], r["seq_len"], r["profile"], r["padding_fraction"])
        cells.setdefault(key, {})[r["provider"]] = r
    rows = []
    for (model, dtype, batch, seq_len, profile, pad), by in cells.items():
        sdpa, comp = by.get("hf-sdpa"), by.get("hf-sdpa-compile")
        for name in OURS:
            r = by.get(name)
            if r is None:
                continue
            cell = f"{model} {dtype} {batch}x{seq_len} {profile} ({100 * pad:.0f}% pad){tag}"
            if r["status"] != "ok":
                reason = (r.get("reason") or "").splitlines()[0][:90] if r.get("reason") else ""
                rows.append(f"| {cell} | {name} | {r['status']}: {reason} | | | | |")
                continue
            med = r["latency_ms_median"]
            x_sdpa = sdpa["latency_ms_median"] / med if sdpa and sdpa["status"] == "ok" else None
            x_comp = comp["latency_ms_median"] / med if comp and comp["status"] == "ok" else None
            mfu = r.get("mfu")
            rows.append(
                f"| {cell} | {name} | {med:.3f} | {_fmt(None if mfu is None else 100 * mfu, '.1f', '%')} | "
                f"{_fmt(x_sdpa, '.2f', 'x')} | {_fmt(x_comp, '.2f', 'x')} | {_fmt(r.get('max_abs_err'), '.1e')} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = argv[0]
    lines = [f"## GPU check summary ({folder})", ""]
    meta = None
    rows: list[str] = []
    for run in RUNS:
        res = _load(os.path.join(folder, f"{run}.json"))
        if res is None:
            continue
        meta = meta or res.get("meta")
        if run == "results":  # the grid: only the measured headline-like cells
            res = dict(res, records=[r for r in res["records"]
                                     if r["batch"] == 32 and r["seq_len"] == 128 and r["status"] != "skipped"])
        partial = " [partial run]" if res.get("meta", {}).get("partial") else ""
        rows += headline_rows(res, partial)
    if meta:
        lines.append(f"{meta.get('device_name')} | torch {meta.get('torch')} | CUDA {meta.get('cuda')} | "
                     f"triton {meta.get('triton')} | transformers {meta.get('transformers')} | "
                     f"git {meta.get('git_revision')}")  # fmt: skip
        lines.append("")
    lines += ["| cell | provider | median ms | MFU | x HF sdpa | x torch.compile | max err vs HF fp32 |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += rows or ["| (no benchmark results found) | | | | | | |"]
    lines.append("")
    for tier in ("quick", "gpu"):
        counts = _junit(os.path.join(folder, f"pytest_{tier}.xml"))
        label = "quick tier (-m gpu_quick)" if tier == "quick" else "full tier (-m gpu)"
        lines.append(f"* tests, {label}: {counts or 'not run or no report'}")
    ceilings = _load(os.path.join(folder, "ceilings.json"))
    if ceilings:
        best = {d: max(v.values()) for d, v in ceilings.get("gemm_TFLOPs", {}).items() if v}
        lines.append(f"* ceilings: copy {ceilings.get('copy_GBps')} GB/s; best GEMM TFLOP/s "
                     + ", ".join(f"{d} {v:.1f}" for d, v in best.items()))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
