"""Per-op speed of the ``cpp`` backend against the ``torch`` reference, BERT-base shapes, on CPU.

Usage: ``python benchmarks/bench_ops.py [--reps 30] [--dtypes float32,bfloat16] [--threads N]``

Shapes: N = 524 packed tokens (the ``mixed`` batch: ``bert_fast.bench.MIXED_LENGTHS``), hidden
768, intermediate 3072, 12 heads. For each op the two backends are timed interleaved, one call
each per round, so machine noise hits both alike; the table shows the median times and the median
of the per-round ratios. ``layer`` is one encoder layer built from the ops (4 GEMMs through
torch.nn.functional.linear without bias + our fused ops) against the 4 GEMMs alone: the model's
overhead over its linear layers. Prints a table; measures only, writes nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from bert_fast import kernels as K
from bert_fast.bench.workloads import MIXED_LENGTHS as LENS

H, INTER, HEADS = 768, 3072, 12


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare(name: str, a, b, reps: int) -> None:
    """a = ours, b = baseline; interleaved rounds."""
    for _ in range(3):
        a(), b()
    ta, tb, ratios = [], [], []
    for _ in range(reps):
        x = _time(a, 1)[0]
        y = _time(b, 1)[0]
        ta.append(x)
        tb.append(y)
        ratios.append(x / y)
    print(
        f"{name:34s} cpp {statistics.median(ta) * 1e3:8.3f} ms   torch {statistics.median(tb) * 1e3:8.3f} ms   "
        f"cpp/torch {statistics.median(ratios):5.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    d = H // HEADS
    scale = 1.0 / math.sqrt(d)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={n}, hidden={H}, heads={HEADS}")
    for dtname in args.dtypes.split(","):
        print(f"--- {dtname}")
        run_dtype(getattr(torch, dtname), cu, n, d, scale, args.reps)


def run_dtype(dt: torch.dtype, cu: torch.Tensor, n: int, d: int, scale: float, reps: int) -> None:
    x = torch.randn(n, H, dtype=dt)
    res = torch.randn(n, H, dtype=dt)
    w, b, lb = (torch.randn(H, dtype=dt) for _ in range(3))
    inter = torch.randn(n, INTER, dtype=dt)
    ib = torch.randn(INTER, dtype=dt)
    qkv = torch.randn(n, 3 * H, dtype=dt)
    q, k, v = (t.view(n, HEADS, d) for t in qkv.split(H, dim=1))
    we, pe, te = torch.randn(30522, H, dtype=dt), torch.randn(512, H, dtype=dt), torch.randn(2, H, dtype=dt)
    ids = torch.randint(0, 30522, (n,))
    pos = torch.cat([torch.arange(L) for L in LENS])
    tt = torch.zeros(n, dtype=torch.long)
    mask = torch.zeros(len(LENS), max(LENS), dtype=torch.long)
    for i, L in enumerate(LENS):
        mask[i, :L] = 1
    indices = K.unpad_mask_ref(mask)[0]
    padded = torch.randn(mask.numel(), H, dtype=dt)

    def both(fn):
        return (lambda: fn("cpp")), (lambda: fn("torch"))

    ops = {
        "bias_residual_layer_norm": lambda be: K.bias_residual_layer_norm(
            x, w, b, 1e-12, linear_bias=lb, residual=res, backend=be
        ),
        "bias_act gelu (N x 3072)": lambda be: K.bias_act(inter, ib, "gelu", backend=be),
        "bias_act gelu_tanh (N x 3072)": lambda be: K.bias_act(inter, ib, "gelu_tanh", backend=be),
        "embed_layer_norm": lambda be: K.embed_layer_norm(ids, pos, tt, we, pe, te, w, b, 1e-12, backend=be),
        "varlen_attention": lambda be: K.varlen_attention(q, k, v, cu, max(LENS), scale=scale, backend=be),
        "unpad_mask": lambda be: K.unpad_mask(mask, backend=be),
        "gather_rows": lambda be: K.gather_rows(padded, indices, backend=be),
        "scatter_rows": lambda be: K.scatter_rows(x, indices, mask.numel(), backend=be),
    }
    with torch.inference_mode():
        for name, fn in ops.items():
            compare(name, *both(fn), reps)

        wqkv, wo = torch.randn(3 * H, H, dtype=dt) * 0.02, torch.randn(H, H, dtype=dt) * 0.02
        wi, wo2 = torch.randn(INTER, H, dtype=dt) * 0.02, torch.randn(H, INTER, dtype=dt) * 0.02
        bqkv = torch.randn(3 * H, dtype=dt)

        def linears():
            F.linear(x, wqkv)
            F.linear(x, wo)
            F.linear(x, wi)
            F.linear(inter, wo2)

        def layer(be):
            h = F.linear(x, wqkv, bqkv)
            qq, kk, vv = (t.view(n, HEADS, d) for t in h.split(H, dim=1))
            a = K.varlen_attention(qq, kk, vv, cu, max(LENS), scale=scale, backend=be).view(n, H)
            h1 = K.bias_residual_layer_norm(F.linear(a, wo), w, b, 1e-12, linear_bias=lb, residual=x, backend=be)
            m = K.bias_act(F.linear(h1, wi), ib, "gelu", backend=be)
            out = F.linear(m, wo2)
            return K.bias_residual_layer_norm(out, w, b, 1e-12, linear_bias=lb, residual=h1, backend=be)

        compare("layer (cpp ops) vs 4 GEMMs only", lambda: layer("cpp"), linears, reps)
        compare("layer (torch ops) vs 4 GEMMs only", lambda: layer("torch"), linears, reps)


if __name__ == "__main__":
    main()
