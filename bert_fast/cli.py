"""Command line: ``bert-fast`` / ``python -m bert_fast``.

* ``bench``: run the benchmark grid (:mod:`bert_fast.bench`), print a table, write JSON + CSV into
  the output folder and (unless ``--no-plot``) draw the charts from the JSON it just wrote.
* ``plot RESULTS.json [-o DIR]``: draw the charts (:mod:`bert_fast.bench.plot`) from a results file.

With no command, ``bench`` runs with its defaults. A subcommand is a ``_add_<name>(subparsers)``
function that adds its parser and sets ``func`` (its handler) as a default; :func:`build_parser`
calls each one listed in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def _csv_list(kind=str):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(x) for x in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import MIXED_LENGTHS, PRESETS, PROFILES, PROVIDERS

    g = p.add_argument_group("what to run (grid options left out take the device's default grid)")
    g.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="infer (default): forward passes; train: one optimizer step (forward, backward, AdamW) per cell, CPU, "
        "providers hf_sdpa, bert_fast, bert_fast_sparse (default) and hf_compile (torch.compile of the HF model; "
        "name it with --providers) (bert_fast.bench.train); uses --model (one preset), "
        "--dtypes (fp32, bf16 autocast), --batch-sizes, --seq-lens (first value), --repeats, --warmup, --seed, "
        "--threads, --train-tasks, --train-lengths",
    )
    g.add_argument("--train-tasks", type=_csv_list(), default=["mlm"], help="train mode: mlm, cls (default mlm)")
    g.add_argument(
        "--train-lengths", type=_csv_list(), default=["mixed", "fixed"], help="train mode: mixed, fixed (default both)"
    )
    g.add_argument(
        "--model",
        type=_csv_list(),
        default=["base"],
        help=f"comma-separated presets ({', '.join(PRESETS)}; random weights, seeded) and/or local checkpoint "
        "directories in Hugging Face layout (default: base)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtypes", type=_csv_list(), help="fp32, bf16, fp16 (default CPU: fp32; CUDA: fp16,bf16)")
    g.add_argument("--batch-sizes", type=_csv_list(int), help="default CPU: 8; CUDA: 8,32")
    g.add_argument("--seq-lens", type=_csv_list(int), help="padded sequence lengths (default CPU: 128; CUDA: 128,512)")
    g.add_argument(
        "--profiles",
        type=_csv_list(),
        help=f"padding profiles: {', '.join(PROFILES)} (fixed: no padding; varlen: lengths uniform in "
        f"[L/8, L], longest = L, seeded; mixed: batch 8, lengths {','.join(map(str, MIXED_LENGTHS))}; mixed32: "
        "batch 32 mixed lengths up to 128; peers: 1x16, 1x128, 8x128 fixed, mixed, mixed32; corpus: the built-in "
        "corpus encoded as sentence-transformers does, sorted, batches of 32). mixed, mixed32, peers and corpus fix "
        "their own shapes. Default CPU: mixed,fixed; CUDA: fixed,varlen,mixed",
    )
    g.add_argument(
        "--providers",
        type=_csv_list(),
        default=list(PROVIDERS),
        help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default: all)",
    )
    g.add_argument("--repeats", type=int, help="timed rounds per cell (default CPU: 3; CUDA: 20)")
    g.add_argument("--warmup", type=int, help="untimed calls per provider and cell first (default CPU: 1; CUDA: 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    g.add_argument("--threads", type=int, help="torch and ONNX Runtime CPU threads (default: torch's default)")
    g.add_argument(
        "--varlen-min-fraction",
        type=float,
        default=0.125,
        help="varlen lengths are drawn uniformly from [ceil(L * this), L] (default 0.125)",
    )
    g.add_argument("--corpus-size", type=int, default=256, help="texts of the corpus profile (default 256)")
    g.add_argument(
        "--time-budget",
        type=float,
        help="seconds; cells not started within it (split evenly between models) are reported as skipped",
    )
    g.add_argument(
        "--compile-dynamic",
        choices=("auto", "true", "false"),
        default="auto",
        help="dynamic= for torch.compile of hf-sdpa-compile (auto: torch's default, recompile on new shapes)",
    )
    g.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: datasheet table)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--out", default="bench_out", help="output folder (default bench_out/)")
    o.add_argument("--name", default="results", help="file name stem: NAME.json, NAME.csv (default results)")
    o.add_argument("--no-plot", action="store_true", help="do not draw the PNG charts")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark bert_fast against HF eager/sdpa, torch.compile, ONNX Runtime, OpenVINO and the GEMM floor",
        description="Benchmark bert_fast side by side with what users would otherwise run. "
        "Without options: BERT-base with random weights on the best device present.",
    )
    _add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)


def _add_plot(sub) -> None:
    plot = sub.add_parser("plot", help="draw PNG charts from a results JSON", description="Draw PNG charts.")
    plot.add_argument("results", help="a results JSON written by `bert-fast bench`")
    plot.add_argument("-o", "--out", help="output folder (default: the JSON's folder)")
    plot.set_defaults(func=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-fast", description="bert_fast tools: benchmark, charts.")
    sub = parser.add_subparsers(dest="command")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _settings(args: argparse.Namespace):
    from .bench import Settings

    return Settings(
        models=args.model,
        device=args.device,
        dtypes=args.dtypes,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        profiles=args.profiles,
        providers=args.providers,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
        varlen_min_fraction=args.varlen_min_fraction,
        corpus_size=args.corpus_size,
        time_budget_s=args.time_budget,
        compile_dynamic=args.compile_dynamic,
        peak_tflops=args.peak_tflops,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    # Benchmarks never download: weights are random (presets) or read from a local folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from . import bench

    t0 = time.perf_counter()
    if args.mode == "train":
        return _cmd_bench_train(args, t0)
    # Written after every cell too: a run cut short (time limit, crash) keeps what it measured.
    results = bench.run(
        _settings(args),
        progress=not args.no_progress,
        checkpoint=lambda partial: bench.write_results(partial, args.out, args.name),
    )
    json_path, csv_path = bench.write_results(results, args.out, args.name)
    print(bench.format_table(results))
    print()
    print(bench.format_ratio_table(results))
    print(f"\nwrote {json_path} and {csv_path}")
    if not args.no_plot:
        from .bench import plot

        try:
            paths = plot.plot_file(json_path, args.out)
            print(f"wrote {len(paths)} charts into {args.out}")
        except ImportError as exc:
            print(f"charts skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_bench_train(args: argparse.Namespace, t0: float) -> int:
    import json

    from .bench import train

    model = args.model[0]
    if model not in train.PRESET_CONFIGS or len(args.model) != 1:
        raise SystemExit(f"--mode train: --model must be one of {sorted(train.PRESET_CONFIGS)}; got {args.model}")
    from .bench import PROVIDERS as INFER_PROVIDERS

    if list(args.providers) == list(INFER_PROVIDERS):  # the default list: every train provider
        providers = train.PROVIDERS
    else:
        providers = tuple(args.providers)
        unknown = [p for p in providers if p not in train.ALL_PROVIDERS]
        if unknown:
            raise SystemExit(f"--mode train: unknown provider(s) {unknown}; choose from {train.ALL_PROVIDERS}")
    result = train.run(
        model=model, tasks=tuple(args.train_tasks), dtypes=tuple(args.dtypes or ["fp32"]),
        lengths=tuple(args.train_lengths), providers=providers, batch_size=(args.batch_sizes or [8])[0],
        seq_len=(args.seq_lens or [128])[0], repeats=args.repeats or 3, warmup=args.warmup or 1, seed=args.seed,
        threads=args.threads,
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print()
    print(train.ratio_table(result))
    print(f"\nwrote {path}\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .bench import plot

    out = args.out or os.path.dirname(os.path.abspath(args.results))
    paths = plot.plot_file(args.results, out)
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["bench", *argv]
    args = build_parser().parse_args(argv)
    return args.func(args)


def _add_embed(sub) -> None:
    from .embed import add_parser  # texts in, embeddings out (bert_fast.embed)

    add_parser(sub)


#: Subcommand registrars, in help order.
SUBCOMMANDS = [_add_bench, _add_plot, _add_embed]


if __name__ == "__main__":
    raise SystemExit(main())
