"""Where one BERT-base forward spends its time: torch.profiler table of one warm forward.

    python benchmarks/profile_forward.py --dtype bf16 --backend cpp [--profile mixed|mixed32|fixed]

Random weights (seeded), the ``mixed`` batch (``bert_fast.bench.MIXED_LENGTHS``) by default; ``fixed``
is the same batch size, unpadded. Prints the ops sorted by self CPU time;
measures nothing else and writes nothing.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import bert_fast
from bert_fast.bench.workloads import FIXED_SHAPE_PROFILES, MIXED_LENGTHS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--profile", choices=[*FIXED_SHAPE_PROFILES, "fixed"], default="mixed")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = transformers.BertConfig()
    lengths = FIXED_SHAPE_PROFILES.get(args.profile, MIXED_LENGTHS)
    batch, seq_len = len(lengths), max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if args.profile != "fixed":
        mask.zero_()
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
    model = transformers.BertModel._from_config(copy.deepcopy(cfg)).eval().to(dtype)
    bert_fast.optimize(model, backend=args.backend)
    with torch.inference_mode():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, attention_mask=mask)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
