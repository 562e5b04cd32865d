"""Read a bench results JSON and a ceilings JSON; print the comparison against the floor (markdown).

Reads data, never measures. For each ok record: median latency, speed ratio to HF sdpa, the
floor of its workload (larger of FLOPs / GEMM ceiling and fewest bytes / copy ceiling, for the
record's dtype; see benchmarks/ceilings.py), the ratio to that floor, and the useful FLOP rate.

Usage: ``python benchmarks/summarize.py RESULTS.json CEILINGS.json``
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ceilings import fewest_bytes  # noqa: E402
from bert_fast.bench import PRESETS, PresetConfig  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        results = json.load(f)
    with open(argv[1], encoding="utf-8") as f:
        ceilings = json.load(f)
    copy_bps = ceilings["copy_GBps"] * 1e9
    meta = results["meta"]
    print(f"results: {argv[0]} ({meta['device_name']}, {meta['threads']} threads, wall {meta['wall_s']} s, "
          f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')})")
    print(f"ceilings: {argv[1]} (copy {ceilings['copy_GBps']} GB/s; GEMM TFLOP/s {ceilings['gemm_TFLOPs']})")
    print()
    print("| cell | provider | median ms | x hf-sdpa | floor ms | x floor | useful GFLOP/s | setup+warmup s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results["records"]:
        cell = f"{r['model']} {r['dtype']} {r['batch']}x{r['seq_len']} {r['profile']}"
        if r["status"] != "ok":
            print(f"| {cell} | {r['provider']} | {r['status']} | | | | | |")
            continue
        gemm = ceilings["gemm_TFLOPs"].get(r["dtype"])
        floor = None
        if gemm and r["model"] in PRESETS:
            elem = {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]]
            nbytes = fewest_bytes(PresetConfig(r["model"]), r["lengths"], r["seq_len"], elem)
            floor = max(r["flops"] / (max(gemm.values()) * 1e12), nbytes / copy_bps) * 1e3
        med = r["latency_ms_median"]
        ratio = f"{r['speedup_vs_hf_sdpa']:.2f}" if r.get("speedup_vs_hf_sdpa") else "-"
        fl = f"{floor:.0f}" if floor else "-"
        xf = f"{med / floor:.2f}" if floor else "-"
        setup = (r.get("setup_s") or 0) + (r.get("warmup_s") or 0)
        print(f"| {cell} | {r['provider']} | {med:.0f} | {ratio} | {fl} | {xf} | "
              f"{r['flops'] / med / 1e6:.0f} | {setup:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
