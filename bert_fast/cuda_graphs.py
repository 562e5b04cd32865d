"""CUDA graphs for the encoder: replay the whole packed encoder in one launch, per shape bucket.

Why: at BERT-base 32x128 bf16 on an H100 the GPU works ~1.5 ms per forward while the host spends
~8 ms launching ~100 kernels and cuBLAS calls (~60 us of host time per cuBLAS call, 15-40 us per
Triton launch, plus Python). A captured graph replays all of them in one call, so the forward
costs the GPU time plus a few launches at the boundary.

How a forward runs with ``bert_fast.optimize(model, cuda_graphs=True)`` (CUDA, eval, no grad):

1. The model validates and packs the batch as always (host syncs allowed there, once): packed
   ``input_ids`` / ``position_ids`` / ``token_type_ids`` (or ``inputs_embeds``) of N tokens,
   ``cu_seqlens`` (B + 1,) and ``max_seqlen``.
2. :func:`bucket_for` rounds the shape up to a :class:`Bucket`: N to :func:`token_bucket` (next
   multiple of 64 up to 512, then four steps per octave: 640, 768, 896, 1024, 1280, ...: at most
   25% padding, 28 buckets up to 16384 tokens); ``max_seqlen`` to the next power of two, at least 16
   (the attention grid depends on it); B to the next power of two. The graph's sequence slots are
   ``B_bucket + dummy_slots(N_bucket, L_bucket)``.
3. The graph of that bucket (captured on first use, least recently used evicted beyond
   ``max_graphs``) reads static input buffers: the real tokens are copied to the front, the other
   ``N_bucket - N`` rows form a **dummy tail** split into sequences of at most ``L_bucket`` tokens,
   and unused slots are empty sequences (:func:`fill_cu_seqlens`: monotone, ends at ``N_bucket``).
   Every op of the encoder is row-wise except attention, which reads only its own sequence, so the
   tail never touches a real token: each real sequence's output is bit-identical to the eager
   forward on the same bucket (and equal to the unbucketed eager forward up to the GEMMs'
   M-dependent rounding). The tail is therefore not rewritten per call: it holds zeros or an
   earlier batch's tokens, always valid ids (so no out-of-range table reads) and finite values.
4. Replay, then the first N rows of the static output are copied out (still under the cache's
   lock, stream-ordered) before another replay can overwrite them; the model scatters them back
   to (B, L, H) and runs the pooler eagerly.

Capture: the first call of a bucket runs the encoder eagerly once on the static buffers, on the
capture stream (Triton autotuning for this bucket's keys, cuBLAS workspaces, the fused-QKV weight
cache all happen there, outside capture), then captures into a memory pool shared by every graph
of the model (intermediates of different graphs reuse one another's memory: replays are serialized
and each output is copied out right after its replay, so that is safe). A bucket whose capture
fails (an op that synchronizes with the host) warns once and runs that bucket eagerly from then on.
:func:`warmup` captures the buckets a server will see before it serves.

Not served by graphs (the ordinary eager forward runs, no error): training mode, grad enabled,
``output_hidden_states=True``, tensors not on CUDA, more than :data:`MAX_GRAPH_TOKENS` tokens, and
Dynamo tracing. ``cuda_graphs=True`` on a CPU model is a documented no-op (it takes effect when the
model moves to CUDA). ``enable(model, emulate=True)`` runs the bucketed eager path without capture
on any device (checks the padding logic on CPU; a debugging aid, never faster).

Weights: graphs read parameters by address. Moving or casting the model (a new storage for the
parameters) and in-place updates seen by version counters of :data:`SENTINELS` parameters spread over
the model drop all graphs. After changing other weights in place,
call :func:`reset` (``load_state_dict`` and optimizer steps update the sentinels too).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

# The bucketing and padding math lives in ._graph_buckets; re-exported here, where callers import it.
from ._graph_buckets import MIN_SEQLEN_BUCKET as MIN_SEQLEN_BUCKET
from ._graph_buckets import TOKEN_LINEAR_MAX as TOKEN_LINEAR_MAX
from ._graph_buckets import TOKEN_STEP as TOKEN_STEP
from ._graph_buckets import (
    Bucket,
    batch_bucket,
    bucket_for,
    dummy_slots,
    fill_cu_seqlens,
    seqlen_bucket,
    token_bucket,
    warmup_lengths,
)

__all__ = [
    "Bucket",
    "DEFAULT_MAX_GRAPHS",
    "GraphCache",
    "MAX_GRAPH_TOKENS",
    "OPTION",
    "bucket_for",
    "dummy_slots",
    "enable",
    "disable",
    "fill_cu_seqlens",
    "reset",
    "seqlen_bucket",
    "set_option",
    "stats",
    "token_bucket",
    "batch_bucket",
    "warmup",
]

#: Default cap on live graphs per model (least recently used evicted beyond it).
DEFAULT_MAX_GRAPHS = 64
#: Larger packed batches run eagerly (their host overhead is small next to their GPU time).
MAX_GRAPH_TOKENS = 1 << 16

OPTION = "_bert_fast_cuda_graphs"  # key in the BertModel's __dict__: a GraphOptions or absent
_TABLE_KEY = "cuda_graphs"  # key in the model's derived-cache table (bert_fast._plan)

# --------------------------------------------------------------------------------------------------
# The graph cache
# --------------------------------------------------------------------------------------------------

#: ``encode(input_ids, position_ids, token_type_ids, inputs_embeds, cu_seqlens, max_seqlen)`` ->
#: (N, hidden): embeddings + LayerNorm and every layer on packed tokens (exactly one of ids/embeds).
Encode = Callable[
    [torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int], torch.Tensor
]


class _Entry:
    """Static buffers (and the graph, once captured) of one bucket."""

    __slots__ = ("bucket", "ids", "pos", "types", "embeds", "cu", "steps", "out", "graph", "failed", "types_zero")

    def __init__(self, bucket: Bucket, device: torch.device, embeds_like: torch.Tensor | None) -> None:
        n = bucket.tokens
        self.bucket = bucket
        self.ids = None if embeds_like is not None else torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.types = torch.zeros(n, dtype=torch.long, device=device)
        self.embeds = (
            None
            if embeds_like is None
            else torch.zeros((n, embeds_like.shape[-1]), dtype=embeds_like.dtype, device=device)
        )
        self.cu = torch.zeros(bucket.seqs + 1, dtype=torch.int32, device=device)
        self.steps = torch.arange(1, bucket.seqs + 1, dtype=torch.int32, device=device) * bucket.max_seqlen
        self.out: torch.Tensor | None = None
        self.graph: Any = None
        self.failed = False
        self.types_zero = True  # self.types holds only zeros

    def fill(self, ids, pos, types, embeds, cu_seqlens, n: int) -> None:
        """Copy one batch to the front of the static buffers (the tail keeps valid earlier values)."""
        if types is None:  # token_type_ids not given: type 0, as transformers does
            if not self.types_zero:
                self.types.zero_()
                self.types_zero = True
        else:
            self.types[:n].copy_(types)
            self.types_zero = False
        for static, src in ((self.ids, ids), (self.pos, pos), (self.embeds, embeds)):
            if static is not None:
                static[:n].copy_(src)
        fill_cu_seqlens(self.cu, cu_seqlens, n, self.bucket, self.steps)

    def encode(self, encode: Encode) -> torch.Tensor:
        return encode(self.ids, self.pos, self.types, self.embeds, self.cu, self.bucket.max_seqlen)


class GraphCache:
    """Captured encoder graphs of one model, one per bucket, at most ``max_graphs`` (LRU).

    ``emulate=True`` never captures: each call runs ``encode`` eagerly on the bucket's static
    buffers (the bucketed, padded computation the graph would replay), on any device.
    Counters (:meth:`stats`): ``captures`` (buckets created), ``evictions``, ``replays``,
    ``eager`` (calls run without a graph: emulation or failed capture).
    """

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS, emulate: bool = False) -> None:
        if int(max_graphs) < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = int(max_graphs)
        self.emulate = bool(emulate)
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._pool: Any = None
        self._stream: Any = None
        self._signature: tuple | None = None
        self.sentinels: list[torch.Tensor] | None = None
        self.captures = 0
        self.evictions = 0
        self.replays = 0
        self.eager = 0

    def __len__(self) -> int:
        return len(self._entries)

    def buckets(self) -> list[tuple]:
        """Keys of the live entries, least recently used first."""
        return list(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "graphs": len(self._entries),
            "max_graphs": self.max_graphs,
            "captures": self.captures,
            "evictions": self.evictions,
            "replays": self.replays,
            "eager": self.eager,
        }

    def clear(self) -> None:
        """Drop every graph, static buffer and the memory pool (the model may be on another device next)."""
        with self._lock:
            self._entries.clear()
            self._signature = None
            self._stream = self._pool = None

    def check_signature(self, signature: tuple) -> None:
        """Drop every graph when ``signature`` (plan, device, dtype, weight storages/versions) changed."""
        if signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    self.clear()
                    self._signature = signature

    def run(self, encode: Encode, *batch: Any) -> torch.Tensor:
        """The (N, hidden) encoder output of one packed ``batch`` (``encode``'s arguments: ``input_ids``,
        ``position_ids``, ``token_type_ids``, ``inputs_embeds``, ``cu_seqlens``, ``max_seqlen``),
        computed on its bucket; a new tensor."""
        input_ids, position_ids, token_type_ids, inputs_embeds, cu_seqlens, max_seqlen = batch
        n = position_ids.shape[0]
        bucket = bucket_for(n, cu_seqlens.shape[0] - 1, max_seqlen)
        device = position_ids.device
        embeds_key = None if inputs_embeds is None else (inputs_embeds.dtype, inputs_embeds.shape[-1])
        key = (bucket.tokens, bucket.seqs, bucket.max_seqlen, embeds_key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(bucket, device, inputs_embeds)
                self._entries[key] = entry
                self.captures += 1
                while len(self._entries) > self.max_graphs:
                    self._entries.popitem(last=False)
                    self.evictions += 1
                entry.fill(input_ids, position_ids, token_type_ids, inputs_embeds, cu_seqlens, n)
                if not self.emulate:
                    self._capture(entry, encode)
            else:
                self._entries.move_to_end(key)
                entry.fill(input_ids, position_ids, token_type_ids, inputs_embeds, cu_seqlens, n)
            if entry.graph is None:
                self.eager += 1
                out = entry.encode(encode)
            else:
                entry.graph.replay()
                self.replays += 1
                out = entry.out
            # Copied out before the lock is released: the next replay overwrites the static output.
            return out[:n].clone()

    def _capture(self, entry: _Entry, encode: Encode) -> None:
        device = entry.pos.device
        with torch.cuda.device(device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
                self._pool = torch.cuda.graph_pool_handle()
            stream = self._stream
            # Eager run first, on the capture stream: autotuning, cuBLAS workspaces and derived
            # weight caches happen here, outside capture.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                entry.encode(encode)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    entry.out = entry.encode(encode)
            except Exception as exc:  # an op synchronized or allocated illegally: this bucket runs eagerly
                entry.out, entry.failed = None, True
                _warn_once(
                    f"capture:{type(exc).__name__}",
                    f"bert_fast: CUDA graph capture failed for {entry.bucket} ({type(exc).__name__}: {exc}); "
                    "this bucket runs eagerly",
                )
                return
            entry.graph = graph


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# The model side: options, the forward hook, warmup
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    max_graphs: int = DEFAULT_MAX_GRAPHS
    emulate: bool = False


def _bert(model: Any):
    from ._optimize import _find_bert

    return _find_bert(model)


def enable(model: Any, max_graphs: int = DEFAULT_MAX_GRAPHS, emulate: bool = False) -> Any:
    """Serve ``model``'s eval, no-grad CUDA forwards from captured graphs; returns ``model``.

    ``model``: an optimized bert_fast model (or task model / SentenceTransformer wrapping one).
    ``max_graphs``: live graphs kept (least recently used evicted). ``emulate``: run the bucketed
    eager path instead of capturing, on any device (tests and debugging). Drops existing graphs.
    """
    from ._optimize import is_optimized

    if int(max_graphs) < 1:
        raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
    if not is_optimized(model):
        raise ValueError("cuda_graphs: the model is not optimized; use bert_fast.optimize(model, cuda_graphs=True)")
    bert = _bert(model)
    bert.__dict__[OPTION] = GraphOptions(int(max_graphs), bool(emulate))
    _drop_cache(bert)
    return model


def set_option(bert, cuda_graphs: bool) -> None:
    """``optimize(..., cuda_graphs=)`` and the drop-in classes: switch graphs on (default options)
    or off for a ``BertModel``; either way the existing graphs are dropped."""
    if cuda_graphs:
        bert.__dict__[OPTION] = GraphOptions()
    else:
        bert.__dict__.pop(OPTION, None)
    _drop_cache(bert)


def disable(model: Any) -> Any:
    """Stop serving ``model`` from graphs and free them; returns ``model``."""
    bert = _bert(model)
    bert.__dict__.pop(OPTION, None)
    _drop_cache(bert)
    return model


def reset(model: Any) -> None:
    """Free every captured graph of ``model`` (call after changing weights in place by other means
    than ``load_state_dict`` or an optimizer); the next forwards capture again."""
    _drop_cache(_bert(model))


def stats(model: Any) -> dict[str, int] | None:
    """Counters of ``model``'s graph cache (``None`` when graphs are off or nothing ran yet)."""
    cache = _cache(_bert(model), create=False)
    return None if cache is None else cache.stats()


def _drop_cache(bert) -> None:
    from . import _plan

    with _plan._lock:
        table = _plan._tables.get(bert)
        cache = table.pop(_TABLE_KEY, None) if table is not None else None
    if cache is not None:
        cache.clear()


def _cache(bert, create: bool = True) -> GraphCache | None:
    from . import _plan

    options = bert.__dict__.get(OPTION)
    if options is None:
        return None
    table = _plan._table(bert)
    cache = table.get(_TABLE_KEY)
    if cache is None and create:
        with _plan._lock:
            cache = table.setdefault(_TABLE_KEY, GraphCache(options.max_graphs, options.emulate))
    return cache


#: Parameters whose storage and version the graphs check on every call (spread over the model).
SENTINELS = 16


def _signature(bert, plan, cache: GraphCache) -> tuple:
    """What the graphs depend on besides the bucket: the plan, and the storage and version of
    sentinel parameters (a move, a cast or an in-place update of them changes it)."""
    sentinels = cache.sentinels
    if sentinels is None:  # chosen once per cache: evenly spaced over the parameters, first and last included
        params = list(bert.parameters())
        step = max(1, -(-len(params) // SENTINELS))
        sentinels = cache.sentinels = params[::step] + params[-1:]
    return (plan,) + tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in sentinels)


def serving_cache(bert, device: torch.device, n_tokens: int, output_hidden_states: bool) -> GraphCache | None:
    """The graph cache that serves this forward, or ``None`` (graphs off, or the call is one the
    graphs do not serve: training, grad enabled, hidden states requested, not CUDA unless
    emulating, too many tokens, Dynamo tracing)."""
    options = bert.__dict__.get(OPTION)
    if options is None:
        return None
    if bert.training or torch.is_grad_enabled() or output_hidden_states or torch.compiler.is_compiling():
        return None
    if device.type != "cuda" and not options.emulate:
        return None
    if n_tokens < 1 or token_bucket(n_tokens) > MAX_GRAPH_TOKENS:
        return None
    return _cache(bert)


def encode_packed(
    bert,
    plan,
    encode: Encode,
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    output_hidden_states: bool,
) -> torch.Tensor | None:
    """The forward hook: the packed (N, hidden) encoder output from a graph, or ``None`` when the
    graphs do not serve this call (the caller then runs its eager path).

    ``encode`` computes embeddings + LayerNorm and every layer on packed tokens; it is called
    only to warm up and capture (and on every call when emulating or after a failed capture).
    """
    cache = serving_cache(bert, position_ids.device, position_ids.shape[0], output_hidden_states)
    if cache is None:
        return None
    cache.check_signature(_signature(bert, plan, cache))
    return cache.run(encode, input_ids, position_ids, token_type_ids, inputs_embeds, cu_seqlens, max_seqlen)


def warmup(
    model: Any,
    batch_sizes: Iterable[int],
    seq_lens: Iterable[int],
    *,
    dtype: torch.dtype | None = None,
    padded: bool = True,
) -> dict[str, int]:
    """Capture, before serving, every graph that batches of these shapes use; returns the stats.

    For each ``B`` in ``batch_sizes`` and ``L`` in ``seq_lens`` this covers every ``input_ids``
    batch whose row count has the power-of-two bucket of ``B``, whose longest row has the
    ``max_seqlen`` bucket of ``L`` (batches padded to their longest row, as tokenizers'
    ``padding=True`` does; for a fixed padding length, what matters is the longest *real* row) and
    any number of real tokens (``padded=False``: only full ``B`` x ``L`` batches). Autotuning and
    capture then happen here, not while serving; :func:`stats` ``captures`` stays put afterwards.
    ``dtype``: the dtype the server runs (a check: graphs are per dtype, so cast the model first).
    Raises ``ValueError`` when these shapes need more graphs than the cache's ``max_graphs``
    (raise it with ``bert_fast.cuda_graphs.enable(model, max_graphs=...)``) or when graphs are
    off. On a model the graphs do not serve (not on CUDA) nothing is captured.
    """
    bert = _bert(model)
    options = bert.__dict__.get(OPTION)
    if options is None:
        raise ValueError("warmup: CUDA graphs are off for this model; use bert_fast.optimize(model, cuda_graphs=True)")
    param = bert.embeddings.word_embeddings.weight
    if dtype is not None and dtype != param.dtype:
        raise ValueError(f"warmup: dtype={dtype} but the model's parameters are {param.dtype}; cast the model first")
    if param.device.type != "cuda" and not options.emulate:
        return {"graphs": 0, "max_graphs": options.max_graphs, "captures": 0, "evictions": 0, "replays": 0,
                "eager": 0}  # fmt: skip
    batches: dict[Bucket, list[int]] = {}
    for b in batch_sizes:
        for length in seq_lens:
            for lengths in warmup_lengths(int(b), int(length), padded):
                batches.setdefault(bucket_for(sum(lengths), len(lengths), max(lengths)), lengths)
    if len(batches) > options.max_graphs:
        raise ValueError(
            f"warmup: these shapes need {len(batches)} graphs but max_graphs={options.max_graphs}; "
            f"pass bert_fast.cuda_graphs.enable(model, max_graphs={len(batches)}) or fewer shapes"
        )
    was_training = bert.training
    bert.eval()
    try:
        with torch.no_grad():
            for lengths in batches.values():
                mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
                for i, n in enumerate(lengths):
                    mask[i, :n] = 1
                mask = mask.to(param.device)
                ids = torch.zeros_like(mask)
                # Token types or not, the graphs read a type buffer (zeros when none is given).
                types = {"token_type_ids": ids} if hasattr(bert.embeddings, "token_type_embeddings") else {}
                bert(input_ids=ids, attention_mask=mask, **types)
    finally:
        bert.train(was_training)
    cache = _cache(bert, create=False)
    return cache.stats() if cache is not None else {}
