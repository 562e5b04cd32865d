"""Python time per encoder layer of bert_fast's forward, with the GEMMs stubbed out.

The GEMMs are replaced by a function returning a preallocated tensor of the right shape, so what
is left per layer is the Python around the ops (backend resolution, validation, caches, views) plus
the small fused kernels on a tiny input. BERT-base config (random weights, nothing downloaded),
eval, ``torch.inference_mode``, one intra-op thread. Time is the calling thread's CPU time
(``time.thread_time``), not wall time: on a shared, oversubscribed machine wall time mostly measures
the other processes, while CPU time counts only the work of this forward.

Compare two trees in one run (alternating child processes, same machine, same load)::

    python benchmarks/python_overhead.py --before DIR [--after DIR2]

DIR, DIR2: directories holding a ``bert_fast/`` package (e.g. ``git archive <commit> bert_fast kernels``
unpacked, with ``kernels/`` moved to ``bert_fast/kernels`` and the built ``_C*.so`` copied in); without
``--after`` the installed tree is the newer one.

Without ``--before`` only the installed tree is measured. Prints one JSON line per measurement and
a summary (median microseconds per layer, per backend and input).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

#: batch x length; "padded" rows of the given lengths. One token keeps the fused kernels' own work
#: (e.g. 3072 erf evaluations per token in bias + GELU) small next to the Python being measured.
CASES = {"1x1": [1], "1x8": [8], "4x16-padded": [16, 9, 3, 12]}


def _child(backend: str, calls: int, warmup: int) -> None:
    import bert_fast.kernels as K
    import torch
    import transformers

    import bert_fast

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the Python is single-threaded; one thread keeps the small kernels' time stable
    cfg = transformers.BertConfig()  # BERT-base
    model = bert_fast.BertModel(cfg).eval()
    bert_fast.optimize(model, backend=backend)
    outputs: dict[tuple, torch.Tensor] = {}

    def stub(x, weight, bias=None, *args, **kwargs):
        key = (*x.shape[:-1], weight.shape[0])
        out = outputs.get(key)
        if out is None:
            out = outputs[key] = torch.randn(key, dtype=x.dtype) * 0.1
        return out

    linear_op = getattr(sys.modules.get("bert_fast.kernels.linear"), "OP", None)
    if linear_op is not None:  # the per-op dispatch: every backend's implementation is the stub
        linear_op.impl = lambda backend, device: stub
    else:  # per-call dispatch: the model calls bert_fast.kernels.linear(...)
        K.linear = stub
    results = {}
    for case, lens in CASES.items():
        seq = max(lens)
        ids = torch.randint(0, cfg.vocab_size, (len(lens), seq))
        mask = (torch.arange(seq)[None] < torch.tensor(lens)[:, None]).long()
        times = []
        with torch.inference_mode():
            for i in range(warmup + calls):
                start = time.thread_time()
                model(ids, attention_mask=mask)
                if i >= warmup:
                    times.append(time.thread_time() - start)
        results[case] = statistics.median(times) / cfg.num_hidden_layers * 1e6
    print("RESULT " + json.dumps(results), flush=True)


def _run(pythonpath: str | None, backend: str, calls: int, warmup: int) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONWARNINGS"] = "ignore"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--child", backend, str(calls), str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/", check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="directory holding an older bert_fast package to compare against")
    parser.add_argument("--after", help="directory holding the newer bert_fast package (default: the installed one)")
    parser.add_argument("--backends", default="cpp,torch")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating child processes per tree")
    args = parser.parse_args()
    trees = {"after": args.after} if not args.before else {"before": args.before, "after": args.after}
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for backend in args.backends.split(","):
            for tree, path in trees.items():
                res = _run(path, backend, args.calls, args.warmup)
                print(json.dumps({"tree": tree, "backend": backend, "us_per_layer": res}), flush=True)
                for case, us in res.items():
                    samples.setdefault((backend, case, tree), []).append(us)
    print("\nmedian CPU time per layer (Python + small kernels), GEMMs stubbed (microseconds):")
    for backend in args.backends.split(","):
        for case in CASES:
            row = {tree: statistics.median(samples[(backend, case, tree)]) for tree in trees}
            ratio = f"  ratio before/after {row['before'] / row['after']:.2f}x" if "before" in row else ""
            cells = "  ".join(f"{t} {v:7.1f}" for t, v in row.items())
            print(f"  {backend:6s} {case:12s} {cells}{ratio}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
