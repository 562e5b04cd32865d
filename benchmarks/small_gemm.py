"""Small-M fp32 GEMMs ``y = x W^T + b`` of BERT-base on the CPU: our packed-weight SGEMM against the peers.

Side by side in one run, per thread count, weight shape (K x N) and row count M:

* ``F.linear``: what PyTorch runs (MKL / oneDNN, unpacked weight);
* ``onednn_packed``: ``torch.ops.mkldnn._linear_pointwise`` on ``_reorder_linear_weight(w, None)``, the
  small-batch path of ``bert_fast.kernels.linear`` until now;
* ``ours``: ``torch.ops.bert_fast.sgemm_packed_linear`` on ``sgemm_pack(w)`` (csrc/cpu/sgemm_avx2.cpp);
* ``ort``: ONNX Runtime's MatMul + Add (its MLAS SGEMM), if ``onnxruntime`` and ``onnx`` import.

Each engine is timed call by call, the engines interleaved round by round (so that a change of the
machine's load hits all of them alike), and the median (``--stat min``: the minimum) of ``--repeats``
calls (after 3 warm-up calls) is reported with its GFLOP/s (2 M N K / time). The CPU model and its
AVX2 / AVX-512 flags are recorded.

``--forward`` also times a BERT-base forward at batch 1 x 16 tokens (fp32, ``cpp`` backend, random
weights) with our SGEMM and with it switched off (the oneDNN-prepacked path), interleaved.

Usage: ``python benchmarks/small_gemm.py [--threads 1,2] [--rows 1,8,16,32,64,128,256] [--forward] [--out FILE.json]``
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
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bert_fast.bench import cpu_model  # noqa: E402

#: BERT-base GEMM shapes (K, N): QKV, attention output, FFN up, FFN down.
SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
ENGINES = ("F.linear", "onednn_packed", "ours", "ort")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted({f for f in line.split(":", 1)[1].split() if f.startswith(("avx2", "avx512", "fma"))})
    except OSError:
        pass
    return []


def _ort_session(w: torch.Tensor, b: torch.Tensor, threads: int):
    """An ONNX Runtime session computing x @ w.T + b, or the reason it cannot be made."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        return None, f"unavailable ({exc})"
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y0"]), helper.make_node("Add", ["y0", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "W"), numpy_helper.from_array(b.numpy(), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # the newest IR this onnxruntime reads may be older than onnx's default
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, f"onnxruntime {ort.__version__}"


def _engines(w: torch.Tensor, b: torch.Tensor, threads: int) -> tuple[dict, dict]:
    """name -> (x -> y) for every engine that runs here, and name -> note (version or why not)."""
    n, k = w.shape
    fns, notes = {"F.linear": lambda x: F.linear(x, w, b)}, {"F.linear": f"torch {torch.__version__}"}
    try:
        wp = torch.ops.mkldnn._reorder_linear_weight(w, None)
        fns["onednn_packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, wp, b, "none", [], "")
        notes["onednn_packed"] = "torch.ops.mkldnn._linear_pointwise"
    except (RuntimeError, AttributeError) as exc:
        notes["onednn_packed"] = f"unavailable ({exc})"
    try:
        import bert_fast.kernels as K

        K.bias_act(torch.zeros(1, 1), None, "relu", backend="cpp")  # loads the extension
        if not torch.ops.bert_fast.sgemm_available():
            raise RuntimeError("no AVX2 + FMA on this CPU")
        packed = torch.ops.bert_fast.sgemm_pack(w)
        fns["ours"] = lambda x: torch.ops.bert_fast.sgemm_packed_linear(x, packed, n, k, b)
        notes["ours"] = "torch.ops.bert_fast.sgemm_packed_linear"
    except Exception as exc:  # no extension, an older build, no AVX2
        notes["ours"] = f"unavailable ({exc})"
    sess, notes["ort"] = _ort_session(w, b, threads)
    if sess is not None:
        fns["ort"] = lambda x: sess.run(None, {"x": x.numpy()})[0]
    return fns, notes


def _measure(fns: dict, x: torch.Tensor, repeats: int, stat=statistics.median) -> dict[str, float]:
    """Seconds per call of each engine (``stat`` of the calls: median, or min), interleaved call by call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(3):
            for fn in fns.values():
                fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: stat(ts) for name, ts in times.items()}


def _check(fns: dict, x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs difference of each engine from F.linear (a benchmark of a wrong result is worthless)."""
    with torch.inference_mode():
        return {name: float((torch.as_tensor(fn(x)) - ref).abs().max()) for name, fn in fns.items()}


def _forward(threads: int, repeats: int, tokens: int = 16) -> dict[str, float]:
    """Median ms of a BERT-base forward (random weights, batch 1 x ``tokens``, fp32, ``cpp`` backend,
    inference) with our SGEMM and with it switched off (oneDNN prepacked), interleaved forward by forward."""
    import importlib

    import transformers

    import bert_fast

    lin = importlib.import_module("bert_fast.kernels.linear")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.BertConfig()
    model = bert_fast.optimize(bert_fast.BertModel(cfg).eval(), backend="cpp")
    ids, mask = torch.randint(0, cfg.vocab_size, (1, tokens)), torch.ones(1, tokens, dtype=torch.long)
    ours = lin._sgemm_available
    variants = {"ours": ours, "onednn_packed": lambda: False}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        with torch.inference_mode():
            for _ in range(2):
                for avail in variants.values():
                    lin._sgemm_available = avail
                    model(input_ids=ids, attention_mask=mask)
            for _ in range(repeats):
                for name, avail in variants.items():
                    lin._sgemm_available = avail
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    times[name].append(time.perf_counter() - t0)
    finally:
        lin._sgemm_available = ours
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--rows", default="1,8,16,32,64,128,256", help="comma-separated row counts M")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,... (BERT-base's)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per engine (median reported)")
    ap.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="per engine and shape: the median of the timed calls (default), or their minimum (best case, for a "
        "machine whose other cores are busy: medians then measure the scheduler)",
    )
    ap.add_argument("--forward", action="store_true", help="also time a BERT-base 1 x 16 forward, SGEMM on / off")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    threads_list = [int(t) for t in args.threads.split(",")]
    rows_list = [int(m) for m in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    info = {"cpu": cpu_model(), "cpu_flags": _cpu_flags(), "machine": platform.machine(), "torch": torch.__version__}
    print(f"CPU: {info['cpu']}  flags: {' '.join(info['cpu_flags']) or '-'}  torch {torch.__version__}")
    results, notes_all = [], {}
    torch.manual_seed(0)
    for threads in threads_list:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): {args.stat} of {args.repeats}, ms (GFLOP/s)")
        print(f"{'K x N':>11} {'M':>4} " + " ".join(f"{e:>18}" for e in ENGINES) + "  ours/oneDNN")
        for k, n in shapes:
            w, b = torch.randn(n, k) * 0.05, torch.randn(n)
            fns, notes = _engines(w, b, threads)
            notes_all.update(notes)
            for m in rows_list:
                x = torch.randn(m, k)
                errs = _check(fns, x, F.linear(x, w, b))
                med = _measure(fns, x, args.repeats, min if args.stat == "min" else statistics.median)
                row = {"threads": threads, "k": k, "n": n, "m": m, "ms": {}, "gflops": {}, "max_abs_err": errs}
                cells = []
                for e in ENGINES:
                    if e in med:
                        row["ms"][e] = med[e] * 1e3
                        row["gflops"][e] = 2 * m * n * k / med[e] / 1e9
                        cells.append(f"{med[e] * 1e3:8.3f} ({row['gflops'][e]:5.1f})")
                    else:
                        cells.append(f"{'unavailable':>18}")
                ratio = med["onednn_packed"] / med["ours"] if {"ours", "onednn_packed"} <= med.keys() else None
                row["speedup_vs_onednn_packed"] = ratio
                print(f"{k:>5} x{n:>5} {m:>4} " + " ".join(cells) + (f"  {ratio:.2f}x" if ratio else ""))
                results.append(row)
    forward = {}
    if args.forward and "ours" in notes_all and not notes_all["ours"].startswith("unavailable"):
        for threads in threads_list:
            med = _forward(threads, args.repeats)
            forward[str(threads)] = med
            print(
                f"BERT-base forward, 1 x 16 tokens, fp32, {threads} thread(s), median of {args.repeats}: ours "
                f"{med['ours']:.1f} ms, oneDNN prepacked {med['onednn_packed']:.1f} ms, "
                f"{med['onednn_packed'] / med['ours']:.2f}x"
            )
    for e in ENGINES:
        print(f"{e}: {notes_all.get(e, 'unavailable')}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            doc = {"argv": sys.argv[1:] if argv is None else argv, "info": info, "engines": notes_all}
            doc.update(stat=args.stat, repeats=args.repeats, results=results, forward_ms=forward)
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
