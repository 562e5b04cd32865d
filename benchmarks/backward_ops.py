"""Fused backward kernels vs what autograd ran before them (the reference recomputed and differentiated).

For attention and embeddings+LayerNorm at BERT-base sizes (8 packed sequences, 12 heads of 64,
vocabulary 30,522, hidden 768), fp32, CPU: the median of ``--repeats`` calls of

* ``reference``: ``<op>_ref`` forward + ``torch.autograd.grad`` (the path without a fused backward);
* ``fused``: the op's backward kernel (``--backend``, default ``cpp``) alone.

Both run side by side in one process; the ratio is the figure to read on a shared machine.

    python benchmarks/backward_ops.py
    python benchmarks/backward_ops.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import bert_fast.kernels as K
import torch
from bert_fast.kernels.attention_backward import varlen_attention_backward
from bert_fast.kernels.embeddings_backward import embed_layer_norm_backward

LENGTHS = [128, 97, 64, 128, 33, 128, 80, 111]


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--backend", default="cpp", help="cpp (CPU) or triton (CUDA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    n, heads, head_dim, longest = sum(LENGTHS), 12, 64, max(LENGTHS)
    q, k, v, g = (torch.randn(n, heads, head_dim) for _ in range(4))

    def attention_ref():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.autograd.grad(K.varlen_attention_ref(*leaves, cu, longest, head_dim**-0.5), leaves, g)

    def attention_fused():
        varlen_attention_backward(g, q, k, v, cu, longest, head_dim**-0.5, backend=args.backend)

    vocab, positions, hidden = 30522, 512, 768
    tables = [torch.randn(vocab, hidden), torch.randn(positions, hidden), torch.randn(2, hidden)]
    w, b = torch.randn(hidden), torch.randn(hidden)
    ids = torch.randint(0, vocab, (n,))
    pos = torch.cat([torch.arange(length) for length in LENGTHS])
    types = torch.randint(0, 2, (n,))
    gh = torch.randn(n, hidden)

    def embed_ref():
        leaves = [t.clone().requires_grad_() for t in (*tables, w, b)]
        torch.autograd.grad(K.embed_layer_norm_ref(ids, pos, types, *leaves, 1e-12), leaves, gh)

    def embed_fused():
        embed_layer_norm_backward(gh, ids, pos, types, *tables, w, b, 1e-12, backend=args.backend)

    print(f"{n} tokens, threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, ref, fused in (("varlen_attention", attention_ref, attention_fused),
                             ("embed_layer_norm", embed_ref, embed_fused)):  # fmt: skip
        # interleaved: reference, fused, reference, fused ...
        tr, tf = [], []
        for _ in range(args.repeats):
            tr.append(median_s(ref, 1))
            tf.append(median_s(fused, 1))
        r, f = statistics.median(tr), statistics.median(tf)
        print(f"{name:18s} reference fwd+autograd {r * 1e3:8.1f} ms   fused backward {f * 1e3:8.1f} ms   {r / f:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
