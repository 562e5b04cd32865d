"""The benchmark package: provider registry, 'unavailable' reporting, workload and corpus definitions.

No timing thresholds: these check structure and statuses, on the ``tiny`` preset.
"""

from __future__ import annotations

import statistics
import sys

import pytest
import torch

from bert_fast import bench
from bert_fast.bench import corpus, workloads

CPU = torch.device("cpu")


def _run(providers, **kw):
    settings = bench.Settings(
        models=["tiny"], device="cpu", dtypes=["fp32"], batch_sizes=[2], seq_lens=[8], profiles=["fixed"],
        providers=providers, repeats=1, warmup=0, **kw,
    )  # fmt: skip
    return bench.run(settings, progress=False)


def test_registry_names_and_factories():
    expected = {"bert_fast", "bert_fast-triton", "bert_fast-cpp", "bert_fast-torch", "hf-eager", "hf-sdpa",
                "hf-sdpa-compile", "hf-compile-freezing", "onnxruntime", "openvino", "linear-floor"}  # fmt: skip
    assert expected <= set(bench.REGISTRY)
    assert bench.PROVIDERS == tuple(bench.REGISTRY)
    for name, spec in bench.REGISTRY.items():
        assert spec.name == name and callable(spec.factory) and spec.description
    assert set(bench.PEERS) <= set(bench.REGISTRY) and bench.BASELINE in bench.PEERS


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(SystemExit, match="--providers: unknown provider 'nope'"):
        bench.validate(bench.Settings(providers=["nope"], dtypes=["fp32"]))
    prov = bench.build_provider("nope", None)  # never raises: recorded as an error
    assert prov.error and "unknown provider 'nope'" in prov.error


def test_registered_provider_runs_and_unavailable_is_reported(monkeypatch):
    seen = []

    def doubled(ctx):
        model = bench.providers.share_weights(ctx.typed)
        seen.append(ctx.dtype)
        return bench.Provider("x", call=lambda **kw: model(**kw).last_hidden_state, notes="registered in a test")

    def missing(ctx):
        raise bench.Unavailable("engine not installed here; pip install it")

    def missing_import(ctx):
        import bert_fast_no_such_engine  # noqa: F401

    monkeypatch.setitem(bench.REGISTRY, "test-double", bench.ProviderSpec("test-double", doubled, "a test double"))
    monkeypatch.setitem(bench.REGISTRY, "test-missing", bench.ProviderSpec("test-missing", missing, "missing"))
    monkeypatch.setitem(bench.REGISTRY, "test-import", bench.ProviderSpec("test-import", missing_import, "missing"))
    results = _run(["hf-sdpa", "test-double", "test-missing", "test-import"])
    by = {r["provider"]: r for r in results["records"]}
    assert seen == ["fp32"]
    assert by["test-double"]["status"] == "ok" and by["test-double"]["notes"] == "registered in a test"
    assert by["test-double"]["max_abs_err"] < 1e-4  # the HF sdpa model, against HF eager
    assert by["test-missing"]["status"] == "unavailable"
    assert by["test-missing"]["reason"] == "engine not installed here; pip install it"
    assert by["test-import"]["status"] == "unavailable" and "bert_fast_no_such_engine" in by["test-import"]["reason"]
    table = bench.format_table(results)
    assert "unavailable[1]" in table and "engine not installed here" in table
    ratio = bench.format_ratio_table(results)
    assert "| unavailable |" in ratio and "1.00x" in ratio  # hf-sdpa against itself


@pytest.mark.parametrize("module,provider", [("openvino", "openvino"), ("onnxruntime", "onnxruntime")])
def test_missing_engine_package_is_unavailable(monkeypatch, module, provider):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    results = _run(["hf-sdpa", provider])
    rec = {r["provider"]: r for r in results["records"]}[provider]
    assert rec["status"] == "unavailable", rec
    assert "not installed" in rec["reason"] and "pip install" in rec["reason"]


def test_engines_unavailable_off_their_device_or_dtype():
    ctx = bench.Context(base=None, typed=None, device=torch.device("cuda"), dtype="fp32")
    prov = bench.build_provider("hf-compile-freezing", ctx)
    assert prov.unavailable and "CPU" in prov.unavailable
    prov = bench.build_provider("openvino", ctx)  # CPU only (or not installed): unavailable either way
    assert prov.unavailable, prov.error


def test_lengths_defined_once():
    assert bench.MIXED_LENGTHS == (128, 16, 72, 40, 100, 24, 88, 56)
    assert sum(bench.MIXED_LENGTHS) == 524
    assert len(bench.MIXED32_LENGTHS) == 32 and max(bench.MIXED32_LENGTHS) == 128
    assert 0.3 < 1 - sum(bench.MIXED32_LENGTHS) / (32 * 128) < 0.6


def test_peers_profile_cells():
    grid = bench.cells(["peers"], [4, 8], [64, 128])  # the grid options do not change the peers cells
    assert grid == [("fixed", 1, 16), ("fixed", 1, 128), ("fixed", 8, 128), ("mixed", 8, 128), ("mixed32", 32, 128)]
    assert bench.cells(["mixed", "peers"], [8], [128]) == grid[3:4] + grid[:3] + grid[4:]  # each cell once
    for profile, batch, seq_len in grid:
        w = bench.make_workload(profile, batch, seq_len, 1000, 0, CPU)
        assert (w.batch, w.seq_len) == (batch, seq_len)
        assert w.attention_mask.sum().item() == w.real_tokens
        assert max(w.lengths) == seq_len and len(w.lengths) == batch
        assert (w.input_ids[w.attention_mask == 0] == 0).all() and (w.input_ids[w.valid] > 0).all()
    assert bench.make_workload("fixed", 8, 128, 1000, 0, CPU).padding_fraction == 0.0
    mixed32 = bench.make_workload("mixed32", 1, 1, 1000, 0, CPU)
    assert mixed32.lengths == list(bench.MIXED32_LENGTHS)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(SystemExit, match="--profiles: unknown profile 'issue6'"):
        bench.validate(bench.Settings(profiles=["issue6"], dtypes=["fp32"]))


def test_builtin_corpus_is_deterministic_varied_and_long_tailed():
    texts = corpus.builtin_corpus(1000, seed=0)
    assert len(texts) == 1000 and texts == corpus.builtin_corpus(1000, seed=0)
    assert texts != corpus.builtin_corpus(1000, seed=1)
    assert corpus.builtin_corpus(10) == texts[:10]  # a prefix of the same stream
    assert len(set(texts)) > 900  # varied
    words = sorted(len(t.split()) for t in texts)
    med = statistics.median(words)
    assert words[0] <= 4 and 6 <= med <= 30 and words[-1] >= 8 * med  # short queries to long paragraphs
    assert all(t.strip() == t and t for t in texts)
    with pytest.raises(ValueError, match="n must be >= 0"):
        corpus.builtin_corpus(-1)


def test_corpus_workload_batches_like_sentence_transformers():
    texts = corpus.builtin_corpus(100)
    order = corpus.sorted_for_encode(texts)
    assert [len(t) for t in order] == sorted((len(t) for t in texts), reverse=True)
    w = bench.make_workload("corpus", 32, 256, 30522, 0, CPU, corpus_size=100)
    assert w.profile == "corpus" and w.batch == 100 and len(w.batches) == 4  # 32 + 32 + 32 + 4
    assert [len(b.lengths) for b in w.batches] == [32, 32, 32, 4]
    for b in w.batches:
        assert b.input_ids.shape[1] == max(b.lengths) <= 256  # each batch padded to its own longest
        assert b.attention_mask.sum().item() == sum(b.lengths)
        assert int(b.input_ids.max()) < 30522
    longest = [max(b.lengths) for b in w.batches]
    assert longest[0] >= longest[-1]  # longest texts first
    assert w.padded_tokens == sum(b.input_ids.numel() for b in w.batches)
    assert 0.0 < w.padding_fraction < 1.0 and w.notes and "sorted by length" in w.notes
    assert bench.cells(["corpus"], [8], [128]) == [("corpus", bench.CORPUS_BATCH, workloads.CORPUS_MAX_LENGTH)]


def test_corpus_synthetic_lengths_without_tokenizer(monkeypatch):
    monkeypatch.setattr(corpus, "_minilm_tokenizer", lambda: None)
    batches, note = corpus.corpus_batches(40, 1000, 0, CPU, max_length=64)
    assert "synthetic" in note and [len(b.lengths) for b in batches] == [32, 8]
    assert all(max(b.lengths) <= 64 and b.input_ids.shape[1] == max(b.lengths) for b in batches)


def test_corpus_profile_runs_end_to_end():
    settings = bench.Settings(
        models=["tiny"], device="cpu", dtypes=["fp32"], profiles=["corpus"], corpus_size=40,
        providers=["hf-sdpa", "bert_fast-torch", "linear-floor"], repeats=1, warmup=0,
    )  # fmt: skip
    results = bench.run(settings, progress=False)
    by = {r["provider"]: r for r in results["records"]}
    assert set(by) == {"hf-sdpa", "bert_fast-torch", "linear-floor"}
    rec = by["bert_fast-torch"]
    assert rec["status"] == "ok", rec["reason"]
    assert rec["num_batches"] == 2 and rec["batch"] == 40 and rec["profile"] == "corpus"
    assert rec["real_tokens"] == sum(rec["lengths"]) and 0 < rec["padding_fraction"] < 1
    assert rec["max_abs_err"] < 1e-4
    assert by["linear-floor"]["status"] == "ok" and by["linear-floor"]["max_abs_err"] is None


def test_env_probes_do_not_need_a_gpu():
    isa = bench.cpu_isa()
    assert isinstance(isa, list) and set(isa) <= set(bench.env.ISA_FLAGS)
    assert bench.cpu_model()
    meta = bench.env.environment(CPU)
    for key in ("cpu_model", "cpu_isa", "openvino", "onnxruntime", "torch", "git_revision", "loadavg_start"):
        assert key in meta


def test_bench_import_does_not_touch_cuda():
    import subprocess

    code = (
        "import torch, sys\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('queried the GPU'))\n"
        "torch.cuda.get_device_name = torch.cuda.is_available\n"
        "import bert_fast.bench, bert_fast.bench.engines, bert_fast.bench.plot, bert_fast.cli\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_compile_providers_lift_the_recompile_limit():
    # Every compiled HF model shares BertModel.forward: dynamo's default limit (8 recompiles) would
    # make later cells run eagerly while reported as compiled.
    import torch._dynamo.config as dynamo_config

    base, _, _ = bench.load_base_model("tiny", CPU, seed=0)
    prov = bench.build_provider("hf-sdpa-compile", bench.Context(base, base, CPU, "fp32"))  # compiles lazily
    assert prov.error is None and prov.call is not None
    assert dynamo_config.recompile_limit >= bench.providers.RECOMPILE_LIMIT
