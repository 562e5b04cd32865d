"""Charts of a benchmark results JSON (written by :mod:`bert_fast.bench.runner`); reads data, never measures.

``python -m bert_fast plot RESULTS.json [-o DIR]`` writes PNGs (matplotlib, Agg backend):

* ``latency_<model>_<dtype>[_<n>].png``: per cell, a bar per provider (median latency, p90 as the
  whisker, the speed ratio to HF sdpa written next to it); providers that did not run are listed
  with their status. Useful even for a single-cell run.
* ``throughput_<model>_<dtype>_<profile>.png``: real tokens/s against sequence length, a line per
  provider, one panel per batch size; when the run has one sequence length per batch size,
  ``throughput_<model>_<dtype>.png`` instead: real tokens/s per provider, grouped by cell.
* ``speedup_<model>.png``: speed ratio to HF sdpa against the batch's padding fraction, one panel
  per dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Any

CELLS_PER_FIGURE = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(providers: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    from .providers import REGISTRY

    cmap = colormaps["tab20"]
    order = list(REGISTRY) + [p for p in providers if p not in REGISTRY]
    return {p: cmap(i % 20) for i, p in enumerate(order)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def _cell_title(r: dict) -> str:
    pad = 100 * r["padding_fraction"]
    return f"{r['model']} {r['dtype']}  batch {r['batch']} x {r['seq_len']}  {r['profile']} (padding {pad:.0f}%)"


def plot_results(results: dict[str, Any], out_dir: str, prefix: str = "") -> list[str]:
    """Draw every chart for ``results``; return the PNG paths. ``prefix`` starts every file name."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    records = results["records"]
    colors = _colors(sorted({r["provider"] for r in records}))
    meta = results.get("meta", {})
    footer = f"{meta.get('device_name', '')} | torch {meta.get('torch', '')} | {meta.get('threads', '')} threads"
    paths: list[str] = []
    paths += _latency_bars(plt, records, colors, out_dir, footer, prefix)
    paths += _throughput(plt, records, colors, out_dir, footer, prefix)
    paths += _speedup(plt, records, colors, out_dir, footer, prefix)
    return paths


def plot_file(json_path: str, out_dir: str | None = None) -> list[str]:
    """Charts of one results file; a file not named ``results.json`` prefixes the PNGs with its stem."""
    with open(json_path, encoding="utf-8") as f:
        results = json.load(f)
    stem = os.path.splitext(os.path.basename(json_path))[0]
    prefix = "" if stem == "results" else stem + "_"
    return plot_results(results, out_dir or os.path.dirname(os.path.abspath(json_path)), prefix)


def _save(plt, fig, path: str, footer: str) -> str:
    fig.text(0.01, 0.005, footer, fontsize=7, color="0.4", ha="left", va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_bars(plt, records, colors, out_dir, footer, prefix: str = "") -> list[str]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["model"], r["dtype"], r["batch"], r["seq_len"], r["profile"])].append(r)
    by_group: dict[tuple, list[tuple]] = defaultdict(list)
    for key in cells:
        by_group[key[:2]].append(key)
    paths = []
    for (model, dtype), keys in by_group.items():
        chunks = [keys[i : i + CELLS_PER_FIGURE] for i in range(0, len(keys), CELLS_PER_FIGURE)]
        for ci, chunk in enumerate(chunks):
            ncols = 1 if len(chunk) == 1 else 2
            nrows = math.ceil(len(chunk) / ncols)
            n_prov = max(len(cells[k]) for k in chunk)
            fig, axes = plt.subplots(
                nrows, ncols, figsize=(7.5 * ncols, 0.42 * n_prov * nrows + 1.3 * nrows + 0.4), squeeze=False
            )
            for ax in axes.flat[len(chunk) :]:
                ax.set_visible(False)
            for ax, key in zip(axes.flat, chunk):
                rows = cells[key]
                _bar_panel(ax, rows, colors)
                ax.set_title(_cell_title(rows[0]), fontsize=9)
            title = f"Latency per provider: {model} {dtype} (median, whisker to p90; lower is better)"
            fig.suptitle(title, fontsize=11)
            fig.tight_layout(rect=(0, 0.02, 1, 0.97))
            suffix = f"_{ci + 1}" if len(chunks) > 1 else ""
            name = f"{prefix}latency_{_slug(model)}_{dtype}{suffix}.png"
            paths.append(_save(plt, fig, os.path.join(out_dir, name), footer))
    return paths


def _bar_panel(ax, rows: list[dict], colors) -> None:
    names = [r["provider"] for r in rows][::-1]
    rows = rows[::-1]
    ok = [r for r in rows if r["status"] == "ok"]
    top = max((r["latency_ms_p90"] or r["latency_ms_median"] for r in ok), default=1.0)
    for y, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(top * 0.01, y, r["status"], va="center", ha="left", fontsize=8, color="0.45", style="italic")
            continue
        med, p90 = r["latency_ms_median"], r["latency_ms_p90"]
        ax.barh(y, med, color=colors[r["provider"]], height=0.7)
        ax.errorbar(med, y, xerr=[[0], [max(0.0, p90 - med)]], color="0.2", capsize=2, lw=0.8)
        label = f"{_ms(med)} ms"
        if r.get("speedup_vs_hf_sdpa"):
            label += f"  ({r['speedup_vs_hf_sdpa']:.2f}x sdpa)"
        ax.text(max(med, p90) + top * 0.01, y, label, va="center", ha="left", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel("latency per batch (ms)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _throughput(plt, records, colors, out_dir, footer, prefix: str = "") -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok" and r["profile"] in ("fixed", "varlen"):  # the others fix their own shape
            groups[(r["model"], r["dtype"], r["profile"])].append(r)
    if all(len({r["seq_len"] for r in rows}) < 2 for rows in groups.values()):
        # One sequence length per batch size: a line has one point. Compare the cells instead.
        return _throughput_cells(plt, records, colors, out_dir, footer, prefix)
    paths = []
    for (model, dtype, profile), rows in groups.items():
        batches = sorted({r["batch"] for r in rows})
        ncols = min(len(batches), 2)
        nrows = math.ceil(len(batches) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(batches) :]:
            ax.set_visible(False)
        for ax, batch in zip(axes.flat, batches):
            sub = [r for r in rows if r["batch"] == batch]
            for prov in sorted({r["provider"] for r in sub}, key=list(colors).index):
                pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in sub if r["provider"] == prov)
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=4, label=prov, color=colors[prov])
            seqs = sorted({r["seq_len"] for r in sub})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.minorticks_off()
            ax.set_xlabel("padded sequence length")
            ax.set_ylabel("real tokens / s")
            ax.set_title(f"batch {batch}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        axes.flat[0].legend(fontsize=8, loc="best")
        fig.suptitle(f"Throughput vs sequence length: {model} {dtype}, profile {profile} (higher is better)")
        fig.tight_layout(rect=(0, 0.02, 1, 0.97))
        name = f"throughput_{_slug(model)}_{dtype}_{profile}.png"
        paths.append(_save(plt, fig, os.path.join(out_dir, prefix + name), footer))
    return paths


def _speedup(plt, records, colors, out_dir, footer, prefix: str = "") -> list[str]:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .report import BASELINE
    from .workloads import DTYPES

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok" and r.get("speedup_vs_hf_sdpa") and r["provider"] != BASELINE:
            groups[r["model"]].append(r)
    paths = []
    for model, rows in groups.items():
        dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: list(DTYPES).index(d) if d in DTYPES else 99)
        fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.6), squeeze=False)
        for ax, dtype in zip(axes.flat, dtypes):
            sub = [r for r in rows if r["dtype"] == dtype]
            for prov in sorted({r["provider"] for r in sub}, key=list(colors).index):
                pts = [(r["padding_fraction"], r["speedup_vs_hf_sdpa"]) for r in sub if r["provider"] == prov]
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=28, label=prov, color=colors[prov], alpha=0.85, edgecolors="none")
            ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("padding fraction of the batch")
            ax.set_ylabel("speed ratio to HF sdpa (x)")
            ax.set_xlim(-0.03, max(0.6, max(r["padding_fraction"] for r in sub) + 0.05))
            ax.set_title(dtype, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8, loc="best")
        fig.suptitle(f"Speedup over HF sdpa vs padding: {model} (above 1 = faster)")
        fig.tight_layout(rect=(0, 0.02, 1, 0.95))
        paths.append(_save(plt, fig, os.path.join(out_dir, prefix + f"speedup_{_slug(model)}.png"), footer))
    return paths


def _throughput_cells(plt, records, colors, out_dir, footer, prefix: str = "") -> list[str]:
    """Real tokens/s per provider, grouped by cell: how throughput holds up as padding grows."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            groups[(r["model"], r["dtype"])].append(r)
    paths = []
    for (model, dtype), rows in groups.items():
        cells = list(dict.fromkeys((r["batch"], r["seq_len"], r["profile"], r["padding_fraction"]) for r in rows))
        provs = sorted({r["provider"] for r in rows}, key=list(colors).index)
        width = 0.8 / len(provs)
        fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(cells) * len(provs) * 0.45 + 2), 4.6))
        for pi, prov in enumerate(provs):
            xs, ys = [], []
            for ci, cell in enumerate(cells):
                hit = [r for r in rows if r["provider"] == prov and (r["batch"], r["seq_len"], r["profile"],
                                                                       r["padding_fraction"]) == cell]
                if hit:
                    xs.append(ci - 0.4 + width * (pi + 0.5))
                    ys.append(hit[0]["tokens_per_s"])
            ax.bar(xs, ys, width=width * 0.92, color=colors[prov], label=prov)
        labels = [f"{b} x {L}, {p}\npadding {100 * f:.0f}%" for b, L, p, f in cells]
        ax.set_xticks(range(len(cells)), labels, fontsize=9)
        ax.set_ylabel("real (non-padding) tokens / s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"Throughput on real tokens: {model} {dtype} (higher is better)")
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        paths.append(_save(plt, fig, os.path.join(out_dir, prefix + f"throughput_{_slug(model)}_{dtype}.png"), footer))
    return paths
