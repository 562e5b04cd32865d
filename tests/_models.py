"""Helpers shared by the model tests: random configs, paired HF/bert_fast models, batches."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from bert_fast.kernels import _backend


def tiny_config(**overrides) -> transformers.BertConfig:
    kw = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def paired(hf_cls, ours_cls, config, **kwargs):
    """An HF eager model and ours with the same weights; configs deep-copied (DESIGN.md §6)."""
    torch.manual_seed(1234)
    ref = hf_cls._from_config(copy.deepcopy(config), attn_implementation="eager", **kwargs)
    _randomize(ref)
    ours = ours_cls(copy.deepcopy(config), **kwargs)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval(), ours.eval()


def _randomize(model: torch.nn.Module) -> None:
    """HF initializes LayerNorms to (1, 0) and biases to 0; perturb them so fusion bugs show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def random_batch(batch_lengths: list[int], config, seq_len: int | None = None, with_types: bool = True):
    """ids, mask, token types for rows of the given lengths (0 = an all-padding row)."""
    seq_len = seq_len or max(max(batch_lengths), 1)
    b = len(batch_lengths)
    ids = torch.randint(0, config.vocab_size, (b, seq_len))
    mask = torch.zeros(b, seq_len, dtype=torch.long)
    for i, n in enumerate(batch_lengths):
        mask[i, :n] = 1
    types = torch.randint(0, config.type_vocab_size, (b, seq_len)) if with_types else None
    return ids, mask, types


def backends_for_models() -> list:
    """The backends a whole-model test runs on here (cpp only when the extension is built)."""
    params = [pytest.param("torch", id="torch")]
    params.append(
        pytest.param(
            "cpp",
            id="cpp",
            marks=pytest.mark.skipif(not _backend.cpp_usable(torch.device("cpu")), reason="bert_fast._C not built"),
        )
    )
    return params
