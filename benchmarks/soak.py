"""Resident memory of a small BERT under a stream of random input shapes (soak test).

A small BERT (random weights; hidden 256, 4 layers, 4 heads by default) is fed ``--calls`` forwards
of random batch sizes (1..``--max-batch``) and lengths (1..``--max-len``) with random right-padding
masks, under ``torch.inference_mode``. Resident memory (``/proc/self/statm``) is read after
``--warmup`` calls and then every ``--every`` calls; the growth after warm-up is what a server or a
corpus job sees. Each configuration runs in its own child process, so no two share a heap:

* ``bert_fast``: ``bert_fast.optimize`` on a transformers ``BertModel`` (``--backends``);
* ``hf``: the same transformers ``BertModel`` with ``attn_implementation="sdpa"``.

Shapes come from ``random.Random(--seed)``: every configuration sees the same stream.

    python benchmarks/soak.py                                  # bert_fast cpp+torch and hf, fp32
    python benchmarks/soak.py --impls bert_fast --backends cpp --dtypes fp32,bf16 --calls 600
    python benchmarks/soak.py --malloc-trim                    # malloc_trim(0) before each reading

Environment variables (``MALLOC_ARENA_MAX``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, ...) pass through to
the children. Prints one JSON object per configuration and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def shapes(seed: int, calls: int, max_batch: int, max_len: int) -> list[tuple[int, list[int]]]:
    """``calls`` (seq_len, row lengths) pairs; the longest row fills seq_len."""
    rng = random.Random(seed)
    out = []
    for _ in range(calls):
        batch, seq = rng.randint(1, max_batch), rng.randint(1, max_len)
        lengths = [rng.randint(1, seq) for _ in range(batch)]
        lengths[rng.randrange(batch)] = seq
        out.append((seq, lengths))
    return out


def _child(args: argparse.Namespace) -> dict:
    import ctypes

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6") if args.malloc_trim else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(args.seed)
    config = transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.max_len), attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.BertModel(config).eval().to(dtype)
    if args.impl == "bert_fast":
        import bert_fast

        bert_fast.optimize(model, backend=args.backend)
        linear = sys.modules["bert_fast.kernels.linear"]
        if args.packed_max_rows >= 0:  # diagnostic: move the cut-off of the prepacked oneDNN GEMMs
            linear.PACKED_MAX_ROWS = args.packed_max_rows
        if args.packed_row_bucket > 0:  # diagnostic: 1 = no rounding of row counts (one primitive each)
            linear.PACKED_ROW_BUCKET = args.packed_row_bucket
    stream = shapes(args.seed, args.calls, args.max_batch, args.max_len)
    gen = torch.Generator().manual_seed(args.seed)

    def reading() -> float:
        if libc is not None:
            libc.malloc_trim(0)
        return rss_mb()

    start_rss = rss_mb()
    curve: list[tuple[int, float]] = []
    base = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (seq, lengths) in enumerate(stream, 1):
            batch = len(lengths)
            ids = torch.randint(0, args.vocab, (batch, seq), generator=gen)
            mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            del out
            if i == args.warmup:
                base = reading()
                curve.append((i, round(base, 1)))
            elif i > args.warmup and (i - args.warmup) % args.every == 0:
                curve.append((i, round(reading(), 1)))
    seconds = time.perf_counter() - t0
    end = reading()
    if base is None:
        base = start_rss
    peak_after = max([r for _, r in curve] + [end])
    return {
        "impl": args.impl,
        "backend": args.backend if args.impl == "bert_fast" else "sdpa",
        "dtype": args.dtype,
        "calls": args.calls,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "malloc_trim": args.malloc_trim,
        "env": {
            k: os.environ[k] for k in sorted(os.environ) if k.startswith(("MALLOC_", "ONEDNN_", "DNNL_", "LD_PRELOAD"))
        },
        "rss_start_mb": round(start_rss, 1),
        "rss_after_warmup_mb": round(base, 1),
        "rss_end_mb": round(end, 1),
        "growth_mb": round(end - base, 1),
        "peak_growth_mb": round(peak_after - base, 1),
        "seconds": round(seconds, 1),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--impls", default="bert_fast,hf", help="comma list of bert_fast, hf")
    p.add_argument("--backends", default="cpp,torch", help="bert_fast backends, comma list")
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--malloc-trim", action="store_true", help="glibc malloc_trim(0) before each reading")
    p.add_argument(
        "--packed-max-rows",
        type=int,
        default=-1,
        help="diagnostic: bert_fast's prepacked-GEMM row cut-off (-1: leave it; 0: never prepacked)",
    )
    p.add_argument(
        "--packed-row-bucket",
        type=int,
        default=0,
        help="diagnostic: bert_fast's row-count rounding for the prepacked GEMMs (0: leave it; 1: none)",
    )
    p.add_argument("--out", default="", help="write the results (a JSON list) here")
    # One configuration, in this process (what the parent runs in each child).
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="bert_fast", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="cpp", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return 0

    common = [
        f"--calls={args.calls}", f"--warmup={args.warmup}", f"--every={args.every}", f"--seed={args.seed}",
        f"--max-batch={args.max_batch}", f"--max-len={args.max_len}", f"--hidden={args.hidden}",
        f"--layers={args.layers}", f"--heads={args.heads}", f"--vocab={args.vocab}", f"--threads={args.threads}",
        f"--packed-max-rows={args.packed_max_rows}", f"--packed-row-bucket={args.packed_row_bucket}",
    ] + (["--malloc-trim"] if args.malloc_trim else [])  # fmt: skip
    configs = []
    for dtype in args.dtypes.split(","):
        for impl in args.impls.split(","):
            for backend in args.backends.split(",") if impl == "bert_fast" else ["sdpa"]:
                configs.append((impl, backend, dtype))
    results = []
    for impl, backend, dtype in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--impl={impl}", f"--backend={backend}",
               f"--dtype={dtype}", *common]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{impl}/{backend}/{dtype} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    for r in results:
        print(f"{r['impl']:>9} {r['backend']:>5} {r['dtype']}: growth after warm-up {r['growth_mb']:+.1f} MB "
              f"(peak {r['peak_growth_mb']:+.1f}, rss {r['rss_after_warmup_mb']:.0f} -> {r['rss_end_mb']:.0f} MB, "
              f"{r['seconds']:.0f} s)")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0 if len(results) == len(configs) else 1


def plot(results: list[dict], path: str) -> None:
    """Resident memory over the calls, one line per configuration (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in results:
        calls, rss = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(calls, [m - r["rss_after_warmup_mb"] for m in rss], marker=".",
                label=f"{r['impl']} {r['backend']} {r['dtype']}: {r['growth_mb']:+.0f} MB")  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("call")
    ax.set_ylabel("resident memory growth after warm-up (MB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
