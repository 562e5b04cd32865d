"""Results as data (JSON, CSV) and as text (the per-record table and the ratio table)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Any

#: 2: the mixed-length profile got its descriptive name ``mixed``; records gained ``compile_s``,
#: ``num_batches``, ``workload_notes``.
SCHEMA_VERSION = 2
STATUSES = ("ok", "unavailable", "error", "skipped")
BASELINE = "hf-sdpa"
#: Providers that are what users would run instead of bert_fast (the bar of the ratio table).
PEERS = ("hf-sdpa", "hf-sdpa-compile", "hf-compile-freezing", "onnxruntime", "openvino")

#: Keys every record has (values may be ``None`` where they do not apply).
RECORD_KEYS = (
    "model", "device", "dtype", "batch", "seq_len", "profile", "provider", "status", "reason",
    "real_tokens", "padding_fraction", "lengths", "num_batches", "repeats", "warmup",
    "latency_ms_median", "latency_ms_p90", "latency_ms_min", "latencies_ms", "seqs_per_s", "tokens_per_s",
    "peak_mem_mb", "speedup_vs_hf_sdpa", "max_abs_err", "flops", "achieved_tflops", "mfu", "peak_tflops",
    "setup_s", "compile_s", "warmup_s", "backend", "notes", "workload_notes",
    "torch", "transformers", "bert_fast", "onnxruntime", "device_name", "threads", "git_revision",
)  # fmt: skip
CSV_COLUMNS = [k for k in RECORD_KEYS if k not in ("lengths", "latencies_ms")]
_CELL = ("model", "device", "dtype", "batch", "seq_len", "profile")


def add_speedups(records: list[dict]) -> None:
    """Set ``speedup_vs_hf_sdpa`` (HF sdpa median / this median, same cell) on every record."""
    base = {tuple(r[k] for k in _CELL): r["latency_ms_median"]
            for r in records if r["provider"] == BASELINE and r["status"] == "ok"}  # fmt: skip
    for r in records:
        b = base.get(tuple(r[k] for k in _CELL))
        r["speedup_vs_hf_sdpa"] = (b / r["latency_ms_median"]) if (b and r.get("latency_ms_median")) else None


def write_results(results: dict[str, Any], out_dir: str, name: str = "results") -> tuple[str, str]:
    """Write ``NAME.json`` and ``NAME.csv`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    csv_path = os.path.join(out_dir, f"{name}.csv")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=1)
        f.write("\n")
    os.replace(tmp, json_path)  # a reader (or a kill) never sees half a file
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rec in results["records"]:
            writer.writerow({k: _csv_value(rec.get(k)) for k in CSV_COLUMNS})
    return json_path, csv_path


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return re.sub(r"\s+", " ", v) if isinstance(v, str) else v


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _footer(meta: dict) -> str:
    isa = ",".join(meta.get("cpu_isa") or []) or "-"
    return (f"{meta['device_name']} (ISA {isa}) | torch {meta['torch']} | transformers {meta['transformers']} | "
            f"onnxruntime {meta.get('onnxruntime')} | openvino {meta.get('openvino')} | threads {meta['threads']} | "
            f"wall {meta.get('wall_s')} s")  # fmt: skip


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: one line per record, reasons for non-ok records as footnotes."""
    head = (
        f"{'model':<8} {'dtype':<5} {'BxL':>8} {'profile':<7} {'pad%':>5} {'provider':<19} {'status':<11} "
        f"{'median ms':>10} {'p90 ms':>9} {'seq/s':>8} {'tok/s':>9} {'mem MB':>7} {'x sdpa':>7} {'max err':>8}"
    )
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    prev = None
    for r in results["records"]:
        group = (r["model"], r["dtype"], r["batch"], r["seq_len"], r["profile"])
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        status = r["status"]
        if status != "ok":
            reason = (r.get("reason") or "").splitlines()[0] if r.get("reason") else ""
            if reason not in notes:
                notes.append(reason)
            status = f"{status}[{notes.index(reason) + 1}]"
        ratio = r.get("speedup_vs_hf_sdpa")
        lines.append(
            f"{r['model']:<8} {r['dtype']:<5} {str(r['batch']) + 'x' + str(r['seq_len']):>8} {r['profile']:<7} "
            f"{100 * r['padding_fraction']:>5.1f} {r['provider']:<19} {status:<11} "
            f"{_fmt(r.get('latency_ms_median'), '10.2f'):>10} {_fmt(r.get('latency_ms_p90'), '9.2f'):>9} "
            f"{_fmt(r.get('seqs_per_s'), '8.1f'):>8} {_fmt(r.get('tokens_per_s'), '9.0f'):>9} "
            f"{_fmt(r.get('peak_mem_mb'), '7.0f'):>7} {(f'{ratio:.2f}x' if ratio else '-'):>7} "
            f"{_fmt(r.get('max_abs_err'), '8.1e'):>8}"
        )
    if notes:
        lines.append("")
        lines.extend(f"[{i + 1}] {n}" for i, n in enumerate(notes))
    lines += ["", _footer(results["meta"])]
    return "\n".join(lines)


def ratio_rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(providers, one row per cell): speed ratio to HF sdpa per provider, and bert_fast over the fastest peer.

    A row: ``cell`` (text), ``ratios`` {provider: x sdpa or status}, ``best_peer`` (name),
    ``vs_best_peer`` (best peer median / bert_fast median; above 1 = bert_fast faster).
    """
    providers = list(dict.fromkeys(r["provider"] for r in results["records"]))
    cells: dict[tuple, list[dict]] = {}
    for r in results["records"]:
        cells.setdefault(tuple(r[k] for k in _CELL), []).append(r)
    rows = []
    for recs in cells.values():
        by = {r["provider"]: r for r in recs}
        r0 = recs[0]
        ratios = {p: (by[p]["speedup_vs_hf_sdpa"] if by[p]["status"] == "ok" else by[p]["status"])
                  for p in providers if p in by}  # fmt: skip
        ok_peers = [by[p] for p in PEERS if p in by and by[p]["status"] == "ok"]
        best = min(ok_peers, key=lambda r: r["latency_ms_median"]) if ok_peers else None
        ours = by.get("bert_fast")
        vs = (best["latency_ms_median"] / ours["latency_ms_median"]
              if best and ours and ours["status"] == "ok" else None)  # fmt: skip
        cell = (f"{r0['model']} {r0['dtype']} {r0['batch']}x{r0['seq_len']} {r0['profile']} "
                f"({100 * r0['padding_fraction']:.0f}% pad)")  # fmt: skip
        rows.append(dict(cell=cell, ratios=ratios, best_peer=best["provider"] if best else None, vs_best_peer=vs))
    return providers, rows


def format_ratio_table(results: dict[str, Any]) -> str:
    """Markdown: cells x providers, speed ratio to HF sdpa (same run), and bert_fast over the fastest peer."""
    providers, rows = ratio_rows(results)
    lines = ["| cell | " + " | ".join(providers) + " | fastest peer | bert_fast / fastest peer |",
             "|---|" + "---:|" * (len(providers) + 2)]  # fmt: skip
    for row in rows:
        vals = []
        for p in providers:
            v = row["ratios"].get(p)
            vals.append("" if v is None else (f"{v:.2f}x" if isinstance(v, float) else str(v)))
        vs = row["vs_best_peer"]
        lines.append(f"| {row['cell']} | " + " | ".join(vals) +
                     f" | {row['best_peer'] or '-'} | {f'{vs:.2f}x' if vs else '-'} |")  # fmt: skip
    lines += ["", f"speed ratio to HF sdpa, medians of one run; {_footer(results['meta'])}"]
    return "\n".join(lines)
