"""``bert-fast embed``: files of texts in, one embedding per text out, resumable.

::

    bert-fast embed docs.jsonl more.txt --model DIR --out emb.parquet [--field text] [--batch-tokens 16384]

Order of work: parse and check every option, read and check every input, check the model
directory (and load it for the local engine), and only then create the hidden parts folder next to
the output. Any problem before that point prints one line on stderr and exits with status 2,
having written nothing. The texts are encoded shard by shard (``--shard-size`` rows) with
:class:`bert_fast.Encoder`; each shard is a file written by atomic rename, so after a crash or a
kill ``--resume`` skips the shards already on disk. The output is assembled from the shards at the
end and renamed into place (see :mod:`bert_fast._embed_io` for the file formats).

Engines: ``local`` (this process; default) and ``ray`` (:mod:`bert_fast._embed_ray`: Ray Data
``map_batches`` over an actor pool, each actor loading the Encoder once).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._embed_io import (
    INPUT_SUFFIXES,
    OUTPUT_SUFFIXES,
    EmbedInputError,
    Shards,
    parts_dir_for,
    read_inputs,
    write_output,
)

__all__ = ["add_parser", "run", "main", "EmbedInputError"]

EXIT_USAGE = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``embed`` subcommand on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "embed",
        help="embed texts from .txt/.jsonl/.parquet files into a parquet or .npy file (resumable)",
        description="Encode every text of the input files (concatenated in order) with bert_fast.Encoder "
        "and write one embedding per text. Inputs: .txt (one text per line, empty lines kept), .jsonl (one "
        "JSON object per line, text in --field; blank lines skipped), .parquet (string column --column). "
        "Output: .parquet (columns id: int64, 0-based row across the inputs; embedding: list<float32>) or "
        ".npy (float32 matrix, row = id). Work is written in shards in a hidden folder next to the output "
        "(.<name>.parts) and the output appears by atomic rename at the end; --resume continues a killed run. "
        "Errors in inputs, model or options are reported before anything is written (exit status 2).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files: .txt, .jsonl or .parquet")
    p.add_argument("--model", required=True, help="local model directory (sentence-transformers or Hugging Face BERT)")
    p.add_argument("-o", "--out", required=True, help="output file: OUT.parquet or OUT.npy")
    p.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    p.add_argument("--column", default="text", help="string column holding the text in .parquet inputs (default: text)")
    p.add_argument(
        "--batch-tokens", type=int, default=16384, help="real tokens per packed batch (default 16384)"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model dtype (default fp32)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--backend",
        choices=("auto", "cpp", "torch", "triton"),
        default="auto",
        help="bert_fast kernel backend (default auto: Triton on CUDA, the C++ extension on CPU)",
    )
    p.add_argument("--max-seq-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    p.add_argument(
        "--shard-size", type=int, default=8192, help="texts per shard, the unit of resuming (default 8192)"
    )
    p.add_argument("--resume", action="store_true", help="continue a killed run from the shards it completed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and discard old shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("engine")
    r.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="local: this process (default); ray: a Ray cluster"
    )
    r.add_argument(
        "--address",
        help="Ray cluster to join (e.g. auto, or ray://HOST:10001); default: start a small local cluster and "
        "shut it down at the end",
    )
    r.add_argument("--ray-actors", type=int, default=1, help="Encoder actors (concurrency, default 1)")
    r.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    r.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    p.set_defaults(func=run)
    return p


def _fingerprint_model(path: str) -> str:
    """Names, sizes and modification times of the model directory's files (weights are not re-read)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_options(args: argparse.Namespace) -> None:
    out_suffix = os.path.splitext(args.out)[1].lower()
    if out_suffix not in OUTPUT_SUFFIXES:
        raise EmbedInputError(f"--out {args.out}: the output must end in .parquet or .npy")
    if args.batch_tokens < 1:
        raise EmbedInputError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.shard_size < 1:
        raise EmbedInputError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise EmbedInputError(f"--max-seq-length must be >= 2, got {args.max_seq_length}")
    if args.resume and args.overwrite:
        raise EmbedInputError("--resume and --overwrite contradict each other; pass one")
    if args.ray_actors < 1 or args.ray_cpus_per_actor < 0 or args.ray_gpus_per_actor < 0:
        raise EmbedInputError("--ray-actors must be >= 1 and --ray-cpus/gpus-per-actor >= 0")
    if args.address and args.engine != "ray":
        raise EmbedInputError("--address is for --engine ray")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise EmbedInputError(f"--out {args.out}: the folder {out_dir} does not exist")
    if os.path.isdir(args.out):
        raise EmbedInputError(f"--out {args.out} is a folder; give a file name ending in .parquet or .npy")
    if os.path.exists(args.out) and not args.overwrite:
        raise EmbedInputError(f"--out {args.out} exists; pass --overwrite to replace it")
    parts = parts_dir_for(args.out)
    if os.path.exists(parts) and not (args.resume or args.overwrite):
        raise EmbedInputError(
            f"{parts} holds shards of an earlier run; pass --resume to continue it or --overwrite to start over"
        )
    if out_suffix == ".parquet" or any(p.lower().endswith(".parquet") for p in args.inputs):
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise EmbedInputError("parquet files need pyarrow: pip install 'bert_fast[embed]'") from exc
    for path in args.inputs:
        if os.path.splitext(path)[1].lower() not in INPUT_SUFFIXES:
            raise EmbedInputError(f"{path}: unsupported input type; use .txt, .jsonl or .parquet")
    if args.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise EmbedInputError("--engine ray needs Ray: pip install 'bert_fast[ray]'") from exc


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="embed", unit="text", dynamic_ncols=True, file=sys.stderr)


class _Progress:
    """Texts done and tokens/s on stderr (tqdm), or nothing."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = _progress(enabled, total, initial)
        self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, texts: int, tokens: int | None) -> None:
        if self.bar is None:
            return
        self.bar.update(texts)
        if tokens is not None:
            self.tokens += tokens
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare(args: argparse.Namespace):
    """Everything that can fail on the user's inputs, before any output is written."""
    from .encoder import Encoder, read_model_dir

    _check_options(args)
    texts, files = read_inputs(args.inputs, field=args.field, column=args.column)
    try:
        model_dir, cfg, hf_config = read_model_dir(args.model)
    except (OSError, ValueError) as exc:
        raise EmbedInputError(f"--model {args.model}: {exc}") from exc
    if args.max_seq_length is not None and args.max_seq_length > hf_config.max_position_embeddings:
        raise EmbedInputError(
            f"--max-seq-length {args.max_seq_length} exceeds the model's max_position_embeddings "
            f"({hf_config.max_position_embeddings})"
        )
    if "BertForSequenceClassification" in (hf_config.architectures or []):
        raise EmbedInputError(f"--model {args.model} is a cross-encoder (sequence classifier), not an embedding model")
    encoder = None
    if args.engine == "local":
        try:
            encoder = Encoder.from_pretrained(
                args.model,
                device=args.device,
                dtype=args.dtype,
                backend=None if args.backend == "auto" else args.backend,
                max_seq_length=args.max_seq_length,
            )
        except (OSError, ValueError) as exc:
            raise EmbedInputError(f"--model {args.model}: {exc}") from exc
    dim = int(hf_config.hidden_size) * len(cfg.modes)
    manifest = {
        "version": 1,
        "inputs": [{"path": f.path, "rows": f.rows, "sha256": f.sha256} for f in files],
        "rows": len(texts),
        "model": os.path.abspath(args.model),
        "model_files": _fingerprint_model(args.model),
        "dtype": args.dtype,
        "field": args.field,
        "column": args.column,
        "max_seq_length": args.max_seq_length,
        "shard_size": args.shard_size,
        "dim": dim,
    }
    shards = Shards(args.out, manifest, len(texts), args.shard_size, dim)
    done: list[int] = []
    if args.resume and os.path.exists(shards.dir):
        done = shards.check_resumable()
    return texts, encoder, shards, done


def _run_local(args: argparse.Namespace, texts: list[str], encoder: Any, shards: Shards, todo: list[int]) -> None:
    done_rows = shards.rows - sum(shards.shard_rows(i)[1] - shards.shard_rows(i)[0] for i in todo)
    progress = _Progress(not args.no_progress, shards.rows, done_rows)
    try:
        for i in todo:
            start, end = shards.shard_rows(i)
            emb = encoder.encode(texts[start:end], batch_tokens=args.batch_tokens, show_progress_bar=False)
            shards.write(i, emb)
            progress.update(end - start, encoder.last_tokens)
    finally:
        progress.close()


def run(args: argparse.Namespace) -> int:
    """The ``embed`` subcommand on parsed arguments; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        texts, encoder, shards, done = _prepare(args)
    except EmbedInputError as exc:
        print(f"bert-fast embed: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # From here on, output is written.
    if not done:
        shards.start_fresh()
    todo = [i for i in range(shards.count) if i not in set(done)]
    t0 = time.perf_counter()
    if args.engine == "ray":
        from ._embed_ray import run_ray

        run_ray(args, texts, shards, todo)
    else:
        _run_local(args, texts, encoder, shards, todo)
    write_output(args.out, shards)
    shards.remove()
    skipped = f", {len(done)} shards reused" if done else ""
    print(
        f"wrote {args.out}: {shards.rows} embeddings of dim {shards.dim} in {time.perf_counter() - t0:.1f} s{skipped}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bert_fast.embed ...`` (same as ``bert-fast embed ...``)."""
    parser = argparse.ArgumentParser(prog="bert-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "embed":
        argv = ["embed", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
