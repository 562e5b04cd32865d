"""The Ray engine of ``bert-fast embed``: the same job over a Ray cluster.

The driver has already read and checked the inputs (:mod:`bert_fast.embed`); the texts of the
shards still to do become a Ray Dataset of ``(id, text)`` rows (``ray.data.from_arrow``).
``map_batches`` runs :class:`EncodeActor` in an actor pool (``--ray-actors`` actors with
``--ray-cpus-per-actor`` / ``--ray-gpus-per-actor`` each), every actor loading the Encoder once.
The driver streams the results back, files each row into its shard by ``id`` (so the order in
which blocks arrive does not matter) and writes every shard as soon as it is complete, exactly as
the local engine does; the output is then assembled by the same code, so both engines give the
same file. ``--resume`` works the same way.

Without ``--address`` a small local cluster is started (CPUs for the actors plus one, no
dashboard, a small object store) and shut down at the end; with it the driver joins that cluster
(``auto``: the one ``ray start`` runs on this node). Every node needs bert_fast installed and the
model directory at the same path.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np

from ._embed_io import Shards

#: object store of the local cluster started without --address (Ray's minimum is 75 MB)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


class EncodeActor:
    """Loads the Encoder once; encodes batches of ``{"id", "text"}`` into ``{"id", "embedding"}``."""

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        backend: str | None,
        max_seq_length: int | None,
        batch_tokens: int,
        threads: int,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch

        from .encoder import Encoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = Encoder.from_pretrained(
            model, device=device, dtype=dtype, backend=backend, max_seq_length=max_seq_length
        )
        self.batch_tokens = batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        emb = self.encoder.encode(texts, batch_tokens=self.batch_tokens, show_progress_bar=False)
        tokens = np.zeros(len(texts), dtype=np.int64)
        if len(texts):
            tokens[0] = self.encoder.last_tokens
        return {"id": batch["id"], "embedding": emb, "tokens": tokens}


def _init_ray(args: argparse.Namespace) -> bool:
    """Connect to the cluster; True when this call started it (and must shut it down)."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    if args.address:
        ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
        return False
    cpus = max(2, math.ceil(args.ray_actors * args.ray_cpus_per_actor) + 1)
    ray.init(
        num_cpus=cpus,
        num_gpus=math.ceil(args.ray_actors * args.ray_gpus_per_actor),
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return True


def run_ray(args: argparse.Namespace, texts: list[str], shards: Shards, todo: list[int]) -> None:
    """Encode the rows of the shards in ``todo`` on Ray and write those shards."""
    import pyarrow as pa
    import ray

    from .embed import _Progress

    if not todo:
        return
    ids = np.concatenate([np.arange(*shards.shard_rows(i), dtype=np.int64) for i in todo])
    started = _init_ray(args)
    progress = _Progress(not args.no_progress, shards.rows, shards.rows - len(ids))
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False  # the whole DataContext, on every run
        table = pa.table({"id": pa.array(ids), "text": pa.array([texts[i] for i in ids], type=pa.string())})
        block_rows = max(1, min(shards.shard_size, math.ceil(len(ids) / max(1, 2 * args.ray_actors))))
        ds = ray.data.from_arrow(table).repartition(max(1, math.ceil(len(ids) / block_rows)))
        ds = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "model": os.path.abspath(args.model),
                "device": args.device,
                "dtype": args.dtype,
                "backend": None if args.backend == "auto" else args.backend,
                "max_seq_length": args.max_seq_length,
                "batch_tokens": args.batch_tokens,
                "threads": max(1, int(args.ray_cpus_per_actor)) if args.ray_gpus_per_actor == 0 else 0,
            },
            batch_size=block_rows,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=args.ray_actors),
            num_cpus=args.ray_cpus_per_actor,
            num_gpus=args.ray_gpus_per_actor or None,
        )
        _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), shards, todo, progress)
    finally:
        progress.close()
        if started:
            ray.shutdown()


def _collect(batches: Any, shards: Shards, todo: list[int], progress: Any) -> None:
    """File rows into their shards by id (any arrival order); write each shard once complete."""
    pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    remaining = set(todo)
    for batch in batches:
        bid = np.asarray(batch["id"], dtype=np.int64)
        emb = np.asarray(batch["embedding"], dtype=np.float32).reshape(len(bid), -1)
        shard_of = bid // shards.shard_size
        for i in np.unique(shard_of).tolist():
            if i not in remaining:
                raise RuntimeError(f"the Ray engine returned rows of shard {i}, which was not asked for")
            start, end = shards.shard_rows(i)
            if i not in pending:
                pending[i] = (np.empty((end - start, shards.dim), np.float32), np.zeros(end - start, bool))
            buf, seen = pending[i]
            sel = shard_of == i
            buf[bid[sel] - start] = emb[sel]
            seen[bid[sel] - start] = True
            if seen.all():
                shards.write(i, buf)
                del pending[i]
                remaining.discard(i)
        progress.update(len(bid), int(np.asarray(batch["tokens"]).sum()))
    if remaining:
        raise RuntimeError(f"the Ray engine returned no rows for shards {sorted(remaining)[:10]}")
