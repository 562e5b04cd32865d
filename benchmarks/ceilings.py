"""Measure this machine's ceilings and the floor they set for a BERT forward (DESIGN.md §7).

Ceilings, through PyTorch in each dtype (median of ``--repeats`` samples after warm-up):

* GEMM, in TFLOP/s: a large square matmul (``--square``; default 2048 on CPU, 8192 on CUDA), the
  BERT-base FFN-up GEMM at the ``mixed`` batch's token count (524 x 768 @ 768 x 3072) and, on
  CUDA, at 32 x 128 tokens (4096 x 768 @ 768 x 3072) and BERT-large's at 8 x 384 tokens
  (3072 x 1024 @ 1024 x 4096);
* copy: ``dst.copy_(src)`` of a ``--copy-mb`` MiB buffer (default 256, far beyond the caches),
  read + write bytes per second.

Each sample times many back-to-back calls between one pair of timestamps (CUDA events on CUDA)
and divides by their number, so that launch overhead is amortised: a single GEMM of BERT shape
lasts tens of microseconds on an H100, about a launch. The count is chosen from a first timing so
that a sample lasts about ``--sample-ms`` (default 20 ms on CUDA, 1 call on CPU).

Work model of one BERT forward on a workload (default: BERT-base on the ``mixed`` batch):

* FLOPs: the four linear layers and attention on the real tokens (``bert_fast.bench.model_flops``);
* fewest bytes: every weight read once (encoder, pooler, the gathered embedding rows), the
  (batch, seq_len, hidden) output written once; activations are assumed to stay in cache.

The floor is the larger of FLOPs / GEMM ceiling and bytes / copy ceiling.

``--time-budget S`` stops starting new measurements after S seconds; ``--out`` is rewritten after
every measurement, so a run cut short keeps what it measured (``"partial": true``).

Usage: ``python benchmarks/ceilings.py [--device cpu] [--out FILE.json] [--time-budget S]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bert_fast.bench import DTYPES, MIXED_LENGTHS, PRESETS, PresetConfig, cpu_model, model_flops  # noqa: E402


def _now(device: torch.device):
    """A timestamp function: CUDA events on CUDA (read after synchronizing), perf_counter on CPU."""
    if device.type == "cuda":

        def mark():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        return mark, lambda a, b: (b.synchronize(), a.elapsed_time(b) / 1e3)[1]
    return time.perf_counter, lambda a, b: b - a


def time_per_call(fn, device: torch.device, repeats: int, sample_s: float, warmup: int = 2) -> tuple[float, int]:
    """(median seconds per call, calls per sample): each sample times ``calls`` back-to-back calls."""
    mark, elapsed = _now(device)
    for _ in range(warmup):
        fn()
    a = mark()
    fn()
    one = max(elapsed(a, mark()), 1e-7)
    calls = 1 if sample_s <= 0 else max(1, min(2000, math.ceil(sample_s / one)))
    samples = []
    for _ in range(repeats):
        a = mark()
        for _ in range(calls):
            fn()
        samples.append(elapsed(a, mark()) / calls)
    return statistics.median(samples), calls


def gemm_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int,
                sample_s: float) -> tuple[float, int]:  # fmt: skip
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    t, calls = time_per_call(lambda: torch.matmul(a, b, out=out), device, repeats, sample_s)
    return 2.0 * m * n * k / t / 1e12, calls


def copy_gbps(mib: int, device: torch.device, repeats: int, sample_s: float) -> float:
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t, _ = time_per_call(lambda: dst.copy_(src), device, repeats, sample_s)
    return 2.0 * src.numel() * 4 / t / 1e9


def fewest_bytes(cfg, lengths, seq_len: int, elem: int) -> int:
    """Bytes one forward must move at least: weights once, gathered embedding rows, the output once."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = (4 * h * h + 4 * h) + (2 * h * i + i + h) + 4 * h  # QKV+O, FFN, two LayerNorms
    tokens = sum(lengths)
    embeddings = tokens * h + min(max(lengths), cfg.max_position_embeddings) * h + h + 2 * h  # rows + LN
    pooler = h * h + h
    weights = layers * per_layer + embeddings + pooler
    output = len(lengths) * seq_len * h
    ids = 3 * 8 * len(lengths) * seq_len  # input_ids, attention_mask, token_type_ids (int64)
    return elem * (weights + output) + ids


def _gemm_shapes(device: torch.device, square: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    base, large = PresetConfig("base"), PresetConfig("large")
    shapes = {
        f"square_{square}": (square, square, square),
        f"ffn_up_{tokens}x{base.hidden_size}x{base.intermediate_size}": (tokens, base.intermediate_size,
                                                                         base.hidden_size),
    }  # fmt: skip
    if device.type == "cuda":
        shapes[f"ffn_up_4096x{base.hidden_size}x{base.intermediate_size}"] = (4096, base.intermediate_size,
                                                                             base.hidden_size)  # fmt: skip
        shapes[f"large_ffn_up_3072x{large.hidden_size}x{large.intermediate_size}"] = (
            3072, large.intermediate_size, large.hidden_size)  # fmt: skip
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16 on CPU; fp32,fp16,bf16 on CUDA")
    p.add_argument("--square", type=int, default=None, help="square GEMM size (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--copy-mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sample-ms", type=float, default=None, help="time per sample (default 20 on CUDA, 0 on CPU)")
    p.add_argument("--model", default="base", choices=sorted(PRESETS))
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later measurements are skipped")
    p.add_argument("--out", help="write the numbers as JSON here (rewritten after every measurement)")
    args = p.parse_args(argv)

    started = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if cuda else "fp32,bf16")).split(",")
    square = args.square or (8192 if cuda else 2048)
    sample_s = (args.sample_ms if args.sample_ms is not None else (20.0 if cuda else 0.0)) / 1e3
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 here, not TF32
    name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    cfg = PresetConfig(args.model)
    lengths, seq_len = list(MIXED_LENGTHS), max(MIXED_LENGTHS)
    tokens = sum(lengths)

    result = {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/ceilings.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "timing": f"median of {args.repeats} samples; each sample {sample_s * 1e3:g} ms of back-to-back calls "
        "(calls per sample in calls_per_sample)",
        "partial": True,
        "copy_GBps": None,
        "gemm_TFLOPs": {},
        "calls_per_sample": {},
        "workload": {
            "model": args.model,
            "lengths": lengths,
            "seq_len": seq_len,
            "real_tokens": tokens,
            "padding_fraction": round(1 - tokens / (len(lengths) * seq_len), 4),
            "flops_padding_free": model_flops(cfg, lengths),
            "flops_padded": model_flops(cfg, [seq_len] * len(lengths)),
            "flops_linear_only": model_flops(cfg, lengths, linear_only=True),
        },
        "padded_over_padding_free_flops": round(
            model_flops(cfg, [seq_len] * len(lengths)) / model_flops(cfg, lengths), 3
        ),
        "floor_ms": {},
        "skipped": [],
    }

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - started, 2)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w", encoding="utf-8") as f:
                f.write(json.dumps(result, indent=1) + "\n")
            os.replace(args.out + ".tmp", args.out)

    def over_budget(what: str) -> bool:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            result["skipped"].append(what)
            return True
        return False

    result["copy_GBps"] = round(copy_gbps(args.copy_mb, device, args.repeats, sample_s), 2)
    save()
    for d in dtypes:
        dt = DTYPES[d]
        result["gemm_TFLOPs"][d], result["calls_per_sample"][d] = {}, {}
        for label, (m, n, k) in _gemm_shapes(device, square, tokens).items():
            if over_budget(f"{d} {label}"):
                continue
            tf, calls = gemm_tflops(m, n, k, dt, device, args.repeats, sample_s)
            result["gemm_TFLOPs"][d][label] = round(tf, 4)
            result["calls_per_sample"][d][label] = calls
            save()
        if not result["gemm_TFLOPs"][d]:
            continue
        nbytes = fewest_bytes(cfg, lengths, seq_len, torch.empty((), dtype=dt).element_size())
        best = max(result["gemm_TFLOPs"][d].values())
        compute_ms = result["workload"]["flops_padding_free"] / (best * 1e12) * 1e3
        memory_ms = nbytes / (result["copy_GBps"] * 1e9) * 1e3
        result["floor_ms"][d] = {
            "fewest_bytes": nbytes,
            "compute_ms_at_gemm_ceiling": round(compute_ms, 4),
            "memory_ms_at_copy_ceiling": round(memory_ms, 4),
            "floor_ms": round(max(compute_ms, memory_ms), 4),
            "bound": "compute" if compute_ms >= memory_ms else "memory",
        }
    result["partial"] = bool(result["skipped"])
    save()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
