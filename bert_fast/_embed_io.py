"""Inputs, shards and outputs of ``bert-fast embed`` (the job itself is in :mod:`bert_fast.embed`).

* Readers: ``.txt`` (one text per line; empty lines are texts too), ``.jsonl`` (one JSON object per
  line, the text in a field; blank lines skipped), ``.parquet`` (a string column). Everything is
  read and checked before any output is written; a problem raises :class:`EmbedInputError` naming
  the file (and line or row).
* Shards: ``shard-NNNNNN.npy`` (float32, ``shard_size`` rows each, the last one shorter) in a hidden
  folder next to the output, ``.<output name>.parts``, each written to a temporary name and renamed,
  so a shard on disk is always complete. ``manifest.json`` there records what the shards belong to
  (inputs' SHA-256, model, options); a resumed run must match it.
* Output: parquet with ``id`` (int64, 0-based row across the inputs in order) and ``embedding``
  (list<float32>), or a float32 ``.npy`` matrix; assembled from the shards into a temporary file in
  the parts folder and renamed onto the output path (same file system), then the folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EmbedInputError",
    "InputFile",
    "read_inputs",
    "parts_dir_for",
    "Shards",
    "write_output",
    "OUTPUT_SUFFIXES",
    "INPUT_SUFFIXES",
]

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".npy")
MANIFEST_VERSION = 1


class EmbedInputError(ValueError):
    """A problem with the job's inputs, output path or options, found before any output is written."""


@dataclass
class InputFile:
    path: str
    rows: int
    sha256: str


def _need_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise EmbedInputError(f"{what} needs pyarrow: pip install 'bert_fast[embed]'") from exc
    return pq


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EmbedInputError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from exc


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another text
    return [x[:-1] if x.endswith("\r") else x for x in lines]


def _read_txt(path: str, data: bytes) -> list[str]:
    return _lines(_decode(path, data))


def _read_jsonl(path: str, data: bytes, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(_lines(_decode(path, data)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EmbedInputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise EmbedInputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if field not in obj:
            fields = ", ".join(sorted(obj)[:10]) or "none"
            raise EmbedInputError(f"{path}:{lineno}: no field {field!r} (fields: {fields}); choose one with --field")
        value = obj[field]
        if not isinstance(value, str):
            raise EmbedInputError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def _read_parquet(path: str, column: str) -> list[str]:
    pq = _need_pyarrow("reading .parquet inputs")
    import pyarrow as pa

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise EmbedInputError(f"{path}: not a readable parquet file ({exc})") from exc
    if column not in schema.names:
        raise EmbedInputError(
            f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); choose one with --column"
        )
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise EmbedInputError(f"{path}: column {column!r} has type {typ}, not string")
    col = pq.read_table(path, columns=[column]).column(column)
    if col.null_count:
        first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
        raise EmbedInputError(f"{path}: column {column!r} has {col.null_count} null values (first at row {first})")
    return col.to_pylist()


def read_inputs(paths: Sequence[str], field: str = "text", column: str = "text") -> tuple[list[str], list[InputFile]]:
    """All texts of ``paths`` concatenated in order, and what each file contributed."""
    if not paths:
        raise EmbedInputError("no input files given")
    texts: list[str] = []
    files: list[InputFile] = []
    for path in paths:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in INPUT_SUFFIXES:
            kind = suffix or "(none)"
            raise EmbedInputError(f"{path}: unsupported input type {kind!r}; use .txt, .jsonl or .parquet")
        if not os.path.exists(path):
            raise EmbedInputError(f"{path}: input file does not exist")
        if not os.path.isfile(path):
            raise EmbedInputError(f"{path}: not a regular file")
        try:
            if suffix == ".parquet":
                got = _read_parquet(path, column)
            else:
                with open(path, "rb") as f:
                    data = f.read()
                got = _read_txt(path, data) if suffix == ".txt" else _read_jsonl(path, data, field)
            digest = _sha256(path)
        except OSError as exc:
            raise EmbedInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        texts.extend(got)
        files.append(InputFile(os.path.abspath(path), len(got), digest))
    return texts, files


def parts_dir_for(out: str) -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.parts")


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.npy"


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Shards:
    """The parts folder of one job: manifest, completed shards, and shard writes by atomic rename."""

    def __init__(self, out: str, manifest: dict, rows: int, shard_size: int, dim: int) -> None:
        self.dir = parts_dir_for(out)
        self.manifest = manifest
        self.rows = rows
        self.shard_size = shard_size
        self.dim = dim
        self.count = max(1, -(-rows // shard_size)) if rows else 0

    def shard_rows(self, i: int) -> tuple[int, int]:
        start = i * self.shard_size
        return start, min(start + self.shard_size, self.rows)

    def _manifest_path(self) -> str:
        return os.path.join(self.dir, "manifest.json")

    def check_resumable(self) -> list[int]:
        """Completed shards of a previous run; raises if that run was a different job."""
        try:
            with open(self._manifest_path(), encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise EmbedInputError(
                f"{self.dir}: no readable manifest.json, so its shards cannot be trusted; start over with --overwrite"
            ) from exc
        diff = sorted(k for k in set(old) | set(self.manifest) if old.get(k) != self.manifest.get(k))
        if diff:
            raise EmbedInputError(
                f"{self.dir}: the shards there were written for a different job (differs: {', '.join(diff)}); "
                "rerun with the same inputs, model and options, or start over with --overwrite"
            )
        return [i for i in range(self.count) if self._valid(i)]

    def _valid(self, i: int) -> bool:
        path = os.path.join(self.dir, _shard_name(i))
        if not os.path.exists(path):
            return False
        start, end = self.shard_rows(i)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        return arr.shape == (end - start, self.dim) and arr.dtype == np.float32

    def start_fresh(self) -> None:
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        tmp = self._manifest_path() + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=1, sort_keys=True)
        os.replace(tmp, self._manifest_path())

    def write(self, i: int, emb: np.ndarray) -> None:
        start, end = self.shard_rows(i)
        if emb.shape != (end - start, self.dim):
            raise RuntimeError(f"shard {i}: got {emb.shape}, expected {(end - start, self.dim)}")
        _atomic_save(os.path.join(self.dir, _shard_name(i)), np.ascontiguousarray(emb, dtype=np.float32))

    def read(self, i: int) -> np.ndarray:
        return np.load(os.path.join(self.dir, _shard_name(i)))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _parquet_table(ids: np.ndarray, emb: np.ndarray):
    import pyarrow as pa

    dim = emb.shape[1]
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (len(ids) + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    return pa.table({"id": pa.array(ids, type=pa.int64()), "embedding": pa.ListArray.from_arrays(offsets, values)})


def write_output(out: str, shards: Shards) -> None:
    """Assemble the completed shards into ``out`` (temporary file, then an atomic rename)."""
    suffix = os.path.splitext(out)[1].lower()
    tmp = os.path.join(shards.dir, "output.tmp" + suffix)
    if suffix == ".npy":
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(shards.rows, shards.dim))
        for i in range(shards.count):
            start, end = shards.shard_rows(i)
            mm[start:end] = shards.read(i)
        mm.flush()
        del mm
    else:
        pq = _need_pyarrow("writing .parquet output")
        import pyarrow as pa

        schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32()))])
        with pq.ParquetWriter(tmp, schema) as writer:
            if shards.count == 0:
                writer.write_table(schema.empty_table())
            for i in range(shards.count):
                start, end = shards.shard_rows(i)
                writer.write_table(_parquet_table(np.arange(start, end, dtype=np.int64), shards.read(i)))
    os.replace(tmp, os.path.abspath(out))


def read_output(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings) of a file written by ``bert-fast embed`` (for checks and tests)."""
    if path.endswith(".npy"):
        emb = np.load(path)
        return np.arange(len(emb), dtype=np.int64), emb
    pq = _need_pyarrow("reading .parquet output")
    table = pq.read_table(path)
    ids = table.column("id").to_numpy()
    col = table.column("embedding").combine_chunks()
    emb = col.flatten().to_numpy().reshape(len(col), -1) if len(col) else np.zeros((0, 0), np.float32)
    return ids, emb.astype(np.float32, copy=False)


def iter_missing(count: int, done: Iterable[int]) -> list[int]:
    done_set = set(done)
    return [i for i in range(count) if i not in done_set]
