"""The BERT family through sentence-transformers and ``bert_fast.Encoder`` (tiny random models saved
to disk with a word-level tokenizer built in memory: nothing is downloaded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from tolerances import EMBEDDING_MIN_COSINE

import bert_fast

tokenizers = pytest.importorskip("tokenizers")
st = pytest.importorskip("sentence_transformers")
st_models = pytest.importorskip("sentence_transformers.models")

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's order: <pad> is 1
WORDS = [f"w{i}" for i in range(60)]
TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11 w12", "w13 w14", "", "w15 w16 w17 w18 w19"] * 3


def _tokenizer(family: str = "xlm-roberta") -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>", model_max_length=32,
        model_input_names=["input_ids", "attention_mask"] + ([] if family == "distilbert" else ["token_type_ids"]),
    )  # fmt: skip


def _config(family: str, **kw):
    vocab = len(SPECIALS) + len(WORDS)
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                             max_position_embeddings=40, pad_token_id=1, **kw)
    cls = {"xlm-roberta": transformers.XLMRobertaConfig, "electra": transformers.ElectraConfig}[family]
    extra = {"embedding_size": 16} if family == "electra" else {"type_vocab_size": 1}
    return cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=40, pad_token_id=1, **extra, **kw)


def _save(tmp_path, family: str, task: str = "Model"):
    prefix = {"xlm-roberta": "XLMRoberta", "electra": "Electra", "distilbert": "DistilBert"}[family]
    cfg = _config(family, num_labels=1) if task != "Model" else _config(family)
    torch.manual_seed(7)
    model = getattr(transformers, prefix + task)(copy.deepcopy(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"{family}-{task}"
    model.save_pretrained(path)
    _tokenizer(family).save_pretrained(path)
    return str(path)


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


@pytest.mark.parametrize("family", ["xlm-roberta", "electra", "distilbert"])
def test_sentence_transformer_and_encoder(tmp_path, family):
    path = _save(tmp_path, family)
    words = st_models.Transformer(path, max_seq_length=32)
    pool = st_models.Pooling(words.get_word_embedding_dimension(), "mean")
    model = st.SentenceTransformer(modules=[words, pool], device="cpu")
    texts = [t or "w0" for t in TEXTS]
    ref = model.encode(texts, convert_to_numpy=True, batch_size=4)
    bert_fast.optimize(model, backend="torch")
    assert bert_fast.is_optimized(model)
    ours = model.encode(texts, convert_to_numpy=True, batch_size=4)
    assert _cos_min(ours, ref) >= EMBEDDING_MIN_COSINE
    enc = bert_fast.Encoder.from_pretrained(path, device="cpu", backend="torch")
    for budget in (16, 10_000):
        got = enc.encode(texts, batch_tokens=budget, normalize=False)
        assert got.shape == ref.shape
        assert _cos_min(got, ref) >= EMBEDDING_MIN_COSINE, budget


@pytest.mark.parametrize("family", ["xlm-roberta", "distilbert"])
def test_cross_encoder_scores(tmp_path, family):
    path = _save(tmp_path, family, "ForSequenceClassification")
    pairs = [("w1 w2", "w3 w4 w5"), ("w6", "w7"), ("w8 w9 w10 w11", "w12"), ("w13", "w14 w15 w16 w17 w18")]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = _tokenizer(family)
    batch = tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt",
                return_token_type_ids=family != "distilbert")
    with torch.no_grad():
        ref = torch.sigmoid(hf(**batch).logits[:, 0])
    enc = bert_fast.Encoder.from_pretrained(path, device="cpu", backend="torch")
    assert enc.is_cross_encoder
    got = enc.score(pairs, batch_tokens=16, output="torch")
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)
