"""Measure this machine's ceilings and the floor they set for a BERT forward (DESIGN.md §7).

Ceilings, through PyTorch in each dtype (median of ``--repeats`` timed calls after warm-up):

* GEMM: a large square matmul (``--square``, default 2048) and the BERT-base FFN-up GEMM at the
  issue-6 token count (524 x 768 @ 768 x 3072), in TFLOP/s;
* copy: ``dst.copy_(src)`` of a ``--copy-mb`` MiB buffer (default 256, far beyond the caches),
  read + write bytes per second.

Work model of one BERT forward on a workload (default: BERT-base on the issue-6 batch):

* FLOPs: the four linear layers and attention on the real tokens (``bert_fast.bench.model_flops``);
* fewest bytes: every weight read once (encoder, pooler, the gathered embedding rows), the
  (batch, seq_len, hidden) output written once; activations are assumed to stay in cache.

The floor is the larger of FLOPs / GEMM ceiling and bytes / copy ceiling.

Usage: ``python benchmarks/ceilings.py [--device cpu] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bert_fast.bench import ISSUE6_LENGTHS, PRESET_COMMON, PRESETS, cpu_model, model_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device: torch.device):
    if device.type == "cuda":

        def t(fn):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3

    else:

        def t(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    return t


def _median_time(fn, device, repeats: int, warmup: int = 2) -> float:
    timer = _timer(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(timer(fn) for _ in range(repeats))


def gemm_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    t = _median_time(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2.0 * m * n * k / t / 1e12


def copy_gbps(mib: int, device: torch.device, repeats: int) -> float:
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * 4 / t / 1e9


class _Cfg:
    def __init__(self, preset: str):
        for k, v in {**PRESET_COMMON, **PRESETS[preset]}.items():
            setattr(self, k, v)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16 on CPU; fp32,fp16,bf16 on CUDA")
    p.add_argument("--square", type=int, default=2048)
    p.add_argument("--copy-mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--model", default="base", choices=sorted(PRESETS))
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    cfg = _Cfg(args.model)
    lengths, seq_len = list(ISSUE6_LENGTHS), max(ISSUE6_LENGTHS)
    tokens = sum(lengths)

    result = {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": "python benchmarks/ceilings.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "copy_GBps": round(copy_gbps(args.copy_mb, device, args.repeats), 2),
        "gemm_TFLOPs": {},
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
    }
    for d in dtypes:
        dt = DTYPES[d]
        sq = gemm_tflops(args.square, args.square, args.square, dt, device, args.repeats)
        ffn = gemm_tflops(tokens, cfg.intermediate_size, cfg.hidden_size, dt, device, args.repeats)
        result["gemm_TFLOPs"][d] = {
            f"square_{args.square}": round(sq, 4),
            f"ffn_up_{tokens}x{cfg.hidden_size}x{cfg.intermediate_size}": round(ffn, 4),
        }
        nbytes = fewest_bytes(cfg, lengths, seq_len, torch.empty((), dtype=dt).element_size())
        best = max(sq, ffn)
        compute_ms = result["workload"]["flops_padding_free"] / (best * 1e12) * 1e3
        memory_ms = nbytes / (result["copy_GBps"] * 1e9) * 1e3
        result["floor_ms"][d] = {
            "fewest_bytes": nbytes,
            "compute_ms_at_gemm_ceiling": round(compute_ms, 2),
            "memory_ms_at_copy_ceiling": round(memory_ms, 2),
            "floor_ms": round(max(compute_ms, memory_ms), 2),
            "bound": "compute" if compute_ms >= memory_ms else "memory",
        }

    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
