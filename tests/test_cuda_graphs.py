"""CUDA graphs over bucketed packed shapes (bert_fast.cuda_graphs).

CPU: the bucketing math, the dummy tail's isolation, the LRU bound, the option's plumbing, and the
whole model through the graph path in emulation mode (the bucketed, padded eager computation a
graph would replay) against the ordinary forward. GPU (``gpu`` marker): replay against eager.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch
import transformers
from bert_fast.kernels import _triton_utils as _tu

import bert_fast
from bert_fast import cuda_graphs as cg
from tests._models import backends_for_models, paired, random_batch, tiny_config
from tests.tolerances import FP32_MODEL_ATOL, HALF_MODEL_FACTOR, assert_close_fp32, assert_half_rule

# --------------------------------------------------------------------------------------------------
# Bucketing math
# --------------------------------------------------------------------------------------------------


def test_token_bucket_rounds_up_within_its_step():
    prev = 0
    distinct = set()
    for n in range(1, 20000):
        b = cg.token_bucket(n)
        distinct.add(b)
        assert b >= n and b >= prev and b % cg.TOKEN_STEP == 0, n
        if n <= cg.TOKEN_LINEAR_MAX:
            assert b - n < cg.TOKEN_STEP, n
        else:
            assert b <= 1.25 * n, (n, b)  # at most 25% padding
        assert cg.token_bucket(b) == b  # a bucket maps to itself
        prev = b
    # Bounded count: 8 linear buckets, then 4 per octave.
    assert len(distinct) <= cg.TOKEN_LINEAR_MAX // cg.TOKEN_STEP + 4 * math.ceil(math.log2(20000 / 512))
    with pytest.raises(ValueError, match="n must be >= 1"):
        cg.token_bucket(0)


def test_seqlen_and_batch_buckets_are_powers_of_two():
    for n in range(1, 600):
        s = cg.seqlen_bucket(n)
        assert s >= max(n, cg.MIN_SEQLEN_BUCKET) and s & (s - 1) == 0 and s < 2 * max(n, cg.MIN_SEQLEN_BUCKET)
        b = cg.batch_bucket(n)
        assert b >= n and b & (b - 1) == 0 and b < 2 * n


def _random_lengths(rng: random.Random) -> list[int]:
    b = rng.randint(1, 40)
    top = rng.choice([1, 7, 16, 33, 128, 300])
    lengths = [rng.randint(0, top) for _ in range(b)]
    lengths[rng.randrange(b)] = top  # the longest row
    return lengths


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("seed", range(6))
def test_padded_cu_seqlens_keep_every_real_token_in_its_sequence(seed):
    rng = random.Random(seed)
    for _ in range(50):
        lengths = _random_lengths(rng)
        n = sum(lengths)
        if n == 0:
            continue
        cu = _cu(lengths)
        bucket = cg.bucket_for(n, len(lengths), max(lengths))
        out = torch.full((bucket.seqs + 1,), -7, dtype=torch.int32)
        cg.fill_cu_seqlens(out, cu, n, bucket)
        # Real offsets unchanged, then monotone up to the bucket's token count.
        assert torch.equal(out[: len(lengths) + 1], cu)
        assert out[0] == 0 and out[-1] == bucket.tokens
        steps = out[1:] - out[:-1]
        assert (steps >= 0).all(), out
        assert int(steps.max()) <= bucket.max_seqlen  # every slot fits the attention grid
        # Token -> sequence map: real tokens keep their sequence; the tail lives in later slots only.
        seq_of = torch.repeat_interleave(torch.arange(bucket.seqs), steps.long())
        assert seq_of.shape[0] == bucket.tokens
        ref = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        assert torch.equal(seq_of[:n], ref)
        assert (seq_of[n:] >= len(lengths)).all()
        # The cached-steps form gives the same offsets.
        steps_t = torch.arange(1, bucket.seqs + 1, dtype=torch.int32) * bucket.max_seqlen
        assert torch.equal(cg.fill_cu_seqlens(torch.empty_like(out), cu, n, bucket, steps_t), out)


def test_fill_cu_seqlens_rejects_a_shape_outside_the_bucket():
    bucket = cg.bucket_for(10, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        cg.fill_cu_seqlens(torch.empty(bucket.seqs + 1, dtype=torch.int32), _cu([1] * (bucket.seqs + 1)), 3, bucket)


# --------------------------------------------------------------------------------------------------
# Autotune keys: one tuning per log2 row bucket (what a graph warm-up at a bucket's size tunes)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(_tu.TRITON_IMPORT_ERROR is not None, reason="triton not importable")
def test_autotuners_are_built_per_log2_row_bucket():
    from bert_fast.kernels.activation import _bias_act_configs, _bias_act_fwd_kernel

    def tuner(rows=None):
        return _tu.autotuned(_bias_act_fwd_kernel, ("n_cols",), _bias_act_configs, rows=rows)

    assert tuner(1) is tuner(64) and tuner(65) is tuner(128)  # same bucket: one autotuner (cached)
    assert tuner(128) is not tuner(129) and tuner(64) is not tuner(65)
    assert tuner(None) is tuner(None) and tuner(None) is not tuner(64)
    for n in (1, 63, 64, 65, 1000, 4096, 4097):
        b = _tu.rows_bucket(n)
        assert b >= max(n, _tu.MIN_ROWS_BUCKET) and b & (b - 1) == 0 and (b == _tu.MIN_ROWS_BUCKET or b < 2 * n)


class _Tuned(Exception):
    pass


def test_every_autotuned_launcher_keys_on_its_row_count(monkeypatch):
    """The launchers pass their token count to ``autotuned`` (checked with the GPU branch forced on
    CPU and a recording stand-in for ``autotuned``)."""
    from bert_fast.kernels import activation, attention, embeddings, layer_norm

    seen = []

    def record(kernel, key, configs_fn, *bucket, rows=None):
        seen.append(rows)
        raise _Tuned

    monkeypatch.setattr(_tu, "INTERPRETING", False)
    monkeypatch.setattr(_tu, "autotuned", record)
    n, h, heads = 37, 64, 4
    x = torch.randn(n, h)
    w = torch.randn(h)
    calls = [
        lambda: activation._bias_act_fwd_impl(torch.randn(n, 96), None, "gelu"),
        lambda: layer_norm._bias_residual_layer_norm_fwd_impl(x, w, w, 1e-12, None, x),
        lambda: embeddings._embed_layer_norm_fwd_impl(
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
            None,
            torch.randn(5, h),
            torch.randn(8, h),
            torch.randn(2, h),
            w,
            w,
            1e-12,
            None,
        ),  # fmt: skip
        lambda: attention._varlen_attention_fwd_impl(
            *torch.randn(3, n, heads, h // heads).unbind(0), torch.tensor([0, 30, n], dtype=torch.int32), 30, 0.25
        ),
    ]
    for call in calls:
        with pytest.raises(_Tuned):
            call()
    assert seen == [n] * len(calls)


# --------------------------------------------------------------------------------------------------
# The cache with a stand-in encoder (per-sequence sums: the one cross-token op, like attention)
# --------------------------------------------------------------------------------------------------


def _segment_encode(ids, pos, types, embeds, cu_seqlens, max_seqlen):
    """Each token gets the sum over its own sequence of ids * 1000 + pos * 10 + type, plus its own id."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    assert int(lens.max()) <= max_seqlen
    seq = torch.repeat_interleave(torch.arange(lens.shape[0]), lens)
    vals = (ids * 1000 + pos * 10 + types).double()
    sums = torch.zeros(lens.shape[0], dtype=torch.float64).index_add_(0, seq, vals)
    return torch.stack([sums[seq], ids.double()], dim=1)


def _packed(lengths: list[int], gen: torch.Generator):
    n = sum(lengths)
    ids = torch.randint(1, 50, (n,), generator=gen)
    pos = torch.cat([torch.arange(k) for k in lengths])
    types = torch.randint(0, 2, (n,), generator=gen)
    return ids, pos, types, _cu(lengths), max(lengths)


def test_emulated_cache_matches_the_unbucketed_computation_and_isolates_the_tail():
    gen = torch.Generator().manual_seed(0)
    cache = cg.GraphCache(max_graphs=8, emulate=True)
    for lengths in ([5, 3, 7], [1], [16, 16], [9, 0, 2, 31], [100, 3, 64, 1, 1]):
        ids, pos, types, cu, max_len = _packed(lengths, gen)
        want = _segment_encode(ids, pos, types, None, cu, max_len)
        got = cache.run(_segment_encode, ids, pos, types, None, cu, max_len)
        assert torch.equal(got, want), lengths
        # No type ids given: type 0 everywhere, as transformers does.
        got = cache.run(_segment_encode, ids, pos, None, None, cu, max_len)
        assert torch.equal(got, _segment_encode(ids, pos, torch.zeros_like(types), None, cu, max_len))
    assert cache.eager > 0 and cache.replays == 0


def test_cache_keeps_at_most_max_graphs_least_recently_used_first():
    gen = torch.Generator().manual_seed(0)
    cache = cg.GraphCache(max_graphs=3, emulate=True)
    shapes = [[60], [120], [200], [300], [400]]  # five token buckets
    keys = []
    for lengths in shapes:
        cache.run(_segment_encode, *_packed(lengths, gen)[:3], None, *_packed(lengths, gen)[3:])
        keys.append(cache.buckets()[-1])
        assert len(cache) <= 3
    assert cache.captures == 5 and cache.evictions == 2
    assert cache.buckets() == keys[2:]
    # A hit refreshes recency: the next new bucket evicts the oldest other one.
    cache.run(_segment_encode, *_packed([200], gen)[:3], None, *_packed([200], gen)[3:])
    assert cache.captures == 5
    cache.run(_segment_encode, *_packed([500], gen)[:3], None, *_packed([500], gen)[3:])
    assert keys[2] in cache.buckets() and keys[3] not in cache.buckets()
    with pytest.raises(ValueError, match="max_graphs"):
        cg.GraphCache(max_graphs=0)


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass


def _fake_cuda(monkeypatch, log: list, fail: bool = False) -> None:
    """Stand-ins for the torch.cuda calls of a capture: record the order of warm-up, capture and replay."""

    class FakeGraph:
        def replay(self) -> None:
            log.append("replay")

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        assert pool == "pool" and isinstance(stream, _FakeStream)
        log.append("capture")
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        yield

    for name, value in {
        "CUDAGraph": FakeGraph, "graph": graph, "graph_pool_handle": lambda: "pool",
        "device": lambda d: contextlib.nullcontext(), "stream": lambda s: contextlib.nullcontext(),
        "Stream": lambda d=None: _FakeStream(), "current_stream": lambda d=None: _FakeStream(),
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)


def test_capture_warms_up_once_then_replays(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, log)

    def encode(*args):
        log.append("encode")
        return _segment_encode(*args)

    gen = torch.Generator().manual_seed(0)
    ids, pos, types, cu, max_len = _packed([7, 3, 12], gen)
    cache = cg.GraphCache(max_graphs=4)
    got = cache.run(encode, ids, pos, types, None, cu, max_len)
    # Eager warm-up (autotuning outside capture), capture, then the first replay.
    assert log == ["encode", "capture", "encode", "replay"]
    assert torch.equal(got, _segment_encode(ids, pos, types, None, cu, max_len))
    cache.run(encode, ids, pos, types, None, cu, max_len)
    assert log[4:] == ["replay"] and cache.stats()["replays"] == 2 and cache.stats()["captures"] == 1


def test_failed_capture_warns_and_serves_the_bucket_eagerly(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, log, fail=True)
    cg._warned.clear()
    gen = torch.Generator().manual_seed(0)
    ids, pos, types, cu, max_len = _packed([4, 9], gen)
    cache = cg.GraphCache(max_graphs=4)
    with pytest.warns(UserWarning, match="capture failed"):
        got = cache.run(_segment_encode, ids, pos, types, None, cu, max_len)
    assert torch.equal(got, _segment_encode(ids, pos, types, None, cu, max_len))
    got = cache.run(_segment_encode, ids, pos, types, None, cu, max_len)  # no second capture attempt
    assert log == ["capture"] and cache.stats()["eager"] == 2 and cache.stats()["replays"] == 0
    assert torch.equal(got, _segment_encode(ids, pos, types, None, cu, max_len))


def test_warmup_lengths_reach_every_bucket_of_their_shape():
    rng = random.Random(0)
    for b, length in ((1, 16), (4, 16), (8, 64), (32, 128), (3, 100)):
        batches = cg.warmup_lengths(b, length)
        got = {cg.bucket_for(sum(x), len(x), max(x)) for x in batches}
        assert len(got) == len(batches)
        for x in batches:
            assert min(x) >= 1 and cg.batch_bucket(len(x)) == cg.batch_bucket(b)
            assert cg.seqlen_bucket(max(x)) == cg.seqlen_bucket(length)
        # Random batches sharing the (rows, longest) buckets land in a warmed bucket.
        for _ in range(300):
            rows = rng.randint(cg.batch_bucket(b) // 2 + 1 if b > 1 else 1, cg.batch_bucket(b))
            top = cg.seqlen_bucket(length)
            longest = rng.randint(1 if top <= cg.MIN_SEQLEN_BUCKET else top // 2 + 1, top)
            lens = [longest] + [rng.randint(1, longest) for _ in range(rows - 1)]
            assert cg.bucket_for(sum(lens), rows, longest) in got
    assert cg.warmup_lengths(3, 10, padded=False) == [[10, 10, 10]]


# --------------------------------------------------------------------------------------------------
# The model in emulation mode (CPU): the bucketed, padded path against the ordinary forward
# --------------------------------------------------------------------------------------------------


def _models(backend: str, **config):
    cfg = tiny_config(**config)
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend=backend)
    graphs = copy.deepcopy(ours)
    cg.enable(graphs, max_graphs=4, emulate=True)
    return cfg, ours, graphs


@pytest.mark.parametrize("backend", backends_for_models())
@pytest.mark.parametrize("lengths", [[8, 8, 8], [5, 1, 12, 0, 7], [33], [1, 1], [30, 2, 17, 9, 9, 4, 25]], ids=str)
def test_emulated_graph_path_equals_the_eager_forward(backend, lengths):
    cfg, ours, graphs = _models(backend)
    ids, mask, types = random_batch(lengths, cfg)
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = graphs(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got_no_types = graphs(input_ids=ids, attention_mask=mask)
        want_no_types = ours(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    stats = cg.stats(graphs)
    assert stats is not None and stats["eager"] == 2 and stats["captures"] == 1
    assert_close_fp32(got.last_hidden_state[valid], want.last_hidden_state[valid], FP32_MODEL_ATOL, "tokens")
    assert (got.last_hidden_state[~valid] == 0).all()
    assert_close_fp32(got.pooler_output, want.pooler_output, FP32_MODEL_ATOL, "pooler")
    assert_close_fp32(
        got_no_types.last_hidden_state[valid], want_no_types.last_hidden_state[valid], FP32_MODEL_ATOL, "no types"
    )


@pytest.mark.skipif(not bert_fast.kernels._backend.interpreter_enabled(), reason="needs the Triton interpreter")
def test_emulated_graph_path_through_the_triton_kernels():
    """The real attention kernel on a bucket: empty slots, a dummy tail, a larger max_seqlen grid."""
    cfg, ours, graphs = _models("triton")
    ids, mask, types = random_batch([5, 1, 12, 0, 7], cfg)
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = graphs(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert cg.stats(graphs)["captures"] == 1
    valid = mask.bool()
    assert_close_fp32(got[valid], want[valid], FP32_MODEL_ATOL, "triton, bucketed")


def test_emulated_graph_path_with_inputs_embeds():
    cfg, ours, graphs = _models("torch")
    ids, mask, _ = random_batch([6, 2, 9], cfg)
    embeds = ours.embeddings.word_embeddings(ids).detach()
    with torch.no_grad():
        want = ours(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        got = graphs(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert cg.stats(graphs)["captures"] == 1
    valid = mask.bool()
    assert_close_fp32(got[valid], want[valid], FP32_MODEL_ATOL, "inputs_embeds")


def test_emulated_graph_path_with_packed_input():
    """HF's flattened layout ((1, T) tokens, cu_seq_lens_q/k, max_length_q/k) goes through the graphs too."""
    cfg, ours, graphs = _models("torch")
    lengths = [5, 1, 9, 3]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = _cu(lengths)
    kw = dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    with torch.no_grad():
        want = ours(ids, **kw)
        got = graphs(ids, **kw)
    assert cg.stats(graphs)["captures"] == 1
    assert_close_fp32(got.last_hidden_state, want.last_hidden_state, FP32_MODEL_ATOL, "packed tokens")
    assert_close_fp32(got.pooler_output, want.pooler_output, FP32_MODEL_ATOL, "packed pooler")


def test_calls_the_graphs_do_not_serve_run_eagerly():
    cfg, ours, graphs = _models("torch")
    ids, mask, types = random_batch([4, 7], cfg)
    with torch.no_grad():
        out = graphs(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.hidden_states is not None and cg.stats(graphs) is None  # nothing went through the cache
    out = graphs(input_ids=ids, attention_mask=mask)  # grad enabled: autograd needs the eager path
    assert out.last_hidden_state.requires_grad and cg.stats(graphs) is None
    graphs.train()
    with torch.no_grad():
        graphs(input_ids=ids, attention_mask=mask)
    assert cg.stats(graphs) is None
    graphs.eval()
    with torch.no_grad():
        graphs(input_ids=ids, attention_mask=mask)
    assert cg.stats(graphs)["captures"] == 1


def test_lru_bound_holds_through_the_model():
    cfg, _, graphs = _models("torch", max_position_embeddings=128)
    with torch.no_grad():
        for n in (10, 70, 130, 200, 260, 330, 390):  # seven token buckets
            ids, mask, types = random_batch([n // 4, n // 4, n // 4, n - 3 * (n // 4)], cfg)
            graphs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    stats = cg.stats(graphs)
    assert stats["graphs"] == 4 and stats["captures"] == 7 and stats["evictions"] == 3


def test_weight_updates_drop_the_graphs():
    cfg, ours, graphs = _models("torch")
    ids, mask, types = random_batch([5, 3], cfg)
    with torch.no_grad():
        graphs(input_ids=ids, attention_mask=mask)
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
        graphs.load_state_dict(ours.state_dict())
        want = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        got = graphs(input_ids=ids, attention_mask=mask).last_hidden_state
    stats = cg.stats(graphs)  # the update dropped the first graph; this call made a new one
    assert stats["captures"] == 2 and stats["graphs"] == 1
    valid = mask.bool()
    assert_close_fp32(got[valid], want[valid], FP32_MODEL_ATOL, "after load_state_dict")


def test_warmup_then_serving_captures_nothing_new():
    cfg, _, graphs = _models("torch", max_position_embeddings=64)
    cg.enable(graphs, max_graphs=16, emulate=True)
    stats = cg.warmup(graphs, batch_sizes=[4], seq_lens=[16])
    warmed = stats["captures"]
    assert warmed == stats["graphs"] == len(cg.warmup_lengths(4, 16))
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(12):
            rows = rng.randint(3, 4)
            lengths = [rng.randint(9, 16)] + [rng.randint(1, 16) for _ in range(rows - 1)]
            ids, mask, types = random_batch(lengths, cfg)
            graphs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert cg.stats(graphs)["captures"] == warmed
    with pytest.raises(ValueError, match="max_graphs"):
        cg.enable(graphs, max_graphs=2, emulate=True)
        cg.warmup(graphs, batch_sizes=[32], seq_lens=[64])
    with pytest.raises(ValueError, match="cast the model"):
        cg.warmup(graphs, batch_sizes=[1], seq_lens=[8], dtype=torch.float16)


# --------------------------------------------------------------------------------------------------
# Plumbing of the option
# --------------------------------------------------------------------------------------------------


def test_cuda_graphs_on_a_cpu_model_is_a_no_op():
    cfg = tiny_config()
    model = bert_fast.BertModel(cfg, backend="torch", cuda_graphs=True).eval()
    ids, mask, _ = random_batch([3, 5], cfg)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert cg.stats(model) is None  # no graph cache on CPU
    assert bert_fast.warmup(model, batch_sizes=[2], seq_lens=[8])["captures"] == 0
    assert model.__dict__[cg.OPTION] == cg.GraphOptions()
    copy.deepcopy(model)  # the option travels with copies; no graph state in the module


def test_option_plumbing_optimize_task_classes_from_pretrained_revert(tmp_path):
    cfg = tiny_config()
    hf = transformers.BertForSequenceClassification(cfg).eval()
    bert_fast.optimize(hf, cuda_graphs=True)
    assert cg.OPTION in hf.bert.__dict__
    bert_fast.optimize(hf)  # re-optimizing without the option switches it off, as for backend=
    assert cg.OPTION not in hf.bert.__dict__
    bert_fast.optimize(hf, cuda_graphs=True)
    bert_fast.revert(hf)
    assert cg.OPTION not in hf.bert.__dict__
    task = bert_fast.BertForSequenceClassification(cfg, cuda_graphs=True)
    assert cg.OPTION in task.bert.__dict__
    task.save_pretrained(tmp_path)
    loaded = bert_fast.BertModel.from_pretrained(tmp_path, cuda_graphs=True)
    assert cg.OPTION in loaded.__dict__
    with pytest.raises(ValueError, match="not optimized"):
        cg.enable(transformers.BertModel(cfg))
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        cg.warmup(bert_fast.BertModel(cfg), batch_sizes=[1], seq_lens=[8])


# --------------------------------------------------------------------------------------------------
# GPU: real capture and replay
# --------------------------------------------------------------------------------------------------


def _gpu_model(dtype: torch.dtype, max_graphs: int = 16):
    """BERT-base shapes, two layers (capture and autotuning time scale with layers, not with bugs):
    (config, fp32 eager reference, graph model in ``dtype``, emulating model in ``dtype``)."""
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref32 = bert_fast.BertModel(cfg).to(device="cuda").eval()
    model = copy.deepcopy(ref32).to(dtype)
    emulated = copy.deepcopy(model)
    cg.enable(model, max_graphs=max_graphs)
    cg.enable(emulated, max_graphs=max_graphs, emulate=True)
    return cfg, ref32, model, emulated


def _cuda_batch(lengths, cfg, seed: int):
    torch.manual_seed(seed)
    ids, mask, types = random_batch(lengths, cfg)
    return ids.cuda(), mask.cuda(), types.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_replay_equals_eager_on_the_same_bucket(dtype):
    cfg, ref32, model, emulated = _gpu_model(dtype)
    plain = copy.deepcopy(model)
    cg.disable(plain)
    cases = [[128] * 8, [128] * 32, [100, 7, 128, 1, 64], [17, 33, 9], [500, 3, 260]]
    with torch.no_grad():
        for seed, lengths in enumerate(cases):
            ids, mask, types = _cuda_batch(lengths, cfg, seed)
            kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
            first = model(**kw).last_hidden_state  # captures
            got = model(**kw).last_hidden_state  # replays
            want = emulated(**kw).last_hidden_state
            eager = plain(**kw).last_hidden_state
            valid = mask.bool()
            assert torch.equal(got[valid], want[valid]), f"{lengths}: replay differs from eager on its bucket"
            assert torch.equal(first, got) and (got[~valid] == 0).all()
            # Against the unbucketed forward: the GEMMs round differently at another M.
            if dtype == torch.float32:
                assert_close_fp32(got[valid], eager[valid], FP32_MODEL_ATOL, f"{lengths}")
            else:
                want32 = ref32(**kw).last_hidden_state
                assert_half_rule(got[valid], eager[valid], want32[valid], HALF_MODEL_FACTOR, f"{lengths}")
    stats = cg.stats(model)
    assert stats["replays"] == 2 * len(cases) and stats["eager"] == 0, stats


@pytest.mark.gpu
def test_graph_memory_stays_bounded_across_many_shapes():
    cfg, _, model, _ = _gpu_model(torch.bfloat16, max_graphs=4)
    rng = random.Random(0)

    def serve(count: int) -> None:
        with torch.no_grad():
            for i in range(count):
                lengths = [rng.randint(1, 128) for _ in range(rng.randint(1, 32))]
                ids, mask, types = _cuda_batch(lengths, cfg, i)
                model(input_ids=ids, attention_mask=mask, token_type_ids=types)

    serve(12)
    torch.cuda.synchronize()
    first = torch.cuda.memory_reserved()
    serve(36)
    torch.cuda.synchronize()
    stats = cg.stats(model)
    assert stats["graphs"] <= 4 and stats["evictions"] > 0, stats
    growth = torch.cuda.memory_reserved() - first
    # Four graphs of <= 4096 tokens: their outputs and intermediates fit well under 256 MiB.
    assert growth <= 256 * 2**20, f"reserved memory grew by {growth / 2**20:.0f} MiB over 36 more shapes"


@pytest.mark.gpu
def test_warmup_then_no_capture_while_serving():
    cfg, _, model, _ = _gpu_model(torch.bfloat16, max_graphs=32)
    stats = cg.warmup(model, batch_sizes=[8], seq_lens=[64], dtype=torch.bfloat16)
    warmed = stats["captures"]
    assert warmed == stats["graphs"] > 0
    rng = random.Random(0)
    with torch.no_grad():
        for i in range(20):
            lengths = [rng.randint(33, 64)] + [rng.randint(1, 64) for _ in range(rng.randint(4, 7))]
            ids, mask, types = _cuda_batch(lengths, cfg, i)
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    after = cg.stats(model)
    assert after["captures"] == warmed and after["replays"] >= warmed + 20, after
