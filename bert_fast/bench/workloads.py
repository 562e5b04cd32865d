"""What the benchmark runs: model presets, padding profiles, workloads and their FLOPs.

Every profile and length list used by the benchmark, the micro-benchmarks (``benchmarks/``) and
the tests is defined here, once.

Profiles (``--profiles``):

* ``fixed``: the grid's batch x seq_len, every sequence seq_len long (no padding).
* ``varlen``: the grid's batch x seq_len, lengths uniform in ``[ceil(seq_len * min_fraction),
  seq_len]`` (seeded), the longest set to seq_len (what ``padding="longest"`` gives).
* ``mixed``: batch 8, lengths :data:`MIXED_LENGTHS` padded to 128 (49% padding), whatever the grid.
* ``mixed32``: batch 32, lengths :data:`MIXED32_LENGTHS` padded to 128 (43% padding).
* ``peers``: the grid of the comparison with other inference engines: batch 1 x 16, batch 1 x 128,
  8 x 128 fixed, ``mixed`` and ``mixed32`` (:data:`PEERS_CELLS`).
* ``corpus``: a sentence-transformers-style encode of the built-in corpus
  (:mod:`bert_fast.bench.corpus`): sorted by length, batches of 32, each padded to its longest.

The shape-fixing profiles ignore ``--batch-sizes`` / ``--seq-lens``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

#: Model presets: random weights from these configurations (seeded), no download.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # RoBERTa-base's shape and tables (positions offset by padding_idx + 1, one token type)
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         layer_norm_eps=1e-5, model_type="roberta"),
}
PRESET_COMMON = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The reference mixed-length batch: batch 8, these lengths, padded to 128 (524 real tokens of 1024).
MIXED_LENGTHS: tuple[int, ...] = (128, 16, 72, 40, 100, 24, 88, 56)
#: A larger mixed-length batch: batch 32, padded to 128 (2348 real tokens of 4096; drawn once, seeded).
MIXED32_LENGTHS: tuple[int, ...] = (
    128, 85, 100, 70, 26, 100, 105, 28, 19, 45, 99, 22, 51, 79, 114, 99,
    101, 75, 19, 22, 103, 122, 33, 37, 101, 67, 84, 73, 99, 71, 110, 61,
)  # fmt: skip

#: Profiles whose lengths are fixed: name -> lengths (batch = len, padded to max).
FIXED_SHAPE_PROFILES: dict[str, tuple[int, ...]] = {"mixed": MIXED_LENGTHS, "mixed32": MIXED32_LENGTHS}
#: The peers grid: (profile, batch, seq_len) cells.
PEERS_CELLS: tuple[tuple[str, int, int], ...] = (
    ("fixed", 1, 16),
    ("fixed", 1, 128),
    ("fixed", 8, 128),
    ("mixed", len(MIXED_LENGTHS), max(MIXED_LENGTHS)),
    ("mixed32", len(MIXED32_LENGTHS), max(MIXED32_LENGTHS)),
)
#: Sequences per batch and longest sequence of the ``corpus`` profile (sentence-transformers'
#: default batch size and all-MiniLM-L6-v2's max_seq_length).
CORPUS_BATCH = 32
CORPUS_MAX_LENGTH = 256

PROFILES = ("fixed", "varlen", "mixed", "mixed32", "peers", "corpus")
#: Profiles that expand into other cells rather than being one.
SUITES = {"peers": PEERS_CELLS}


@dataclasses.dataclass
class Batch:
    """One padded batch: the inputs of one forward."""

    lengths: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None  # None: the model takes no token types (DistilBERT)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The model's inputs by name, in the order the engines export them (no ``token_type_ids`` if None)."""
        out = dict(input_ids=self.input_ids, attention_mask=self.attention_mask)
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


@dataclasses.dataclass
class Workload:
    """One benchmark cell: one batch, or (``corpus``) a sequence of batches run one after another."""

    profile: str
    batch: int  # sequences in all
    seq_len: int  # longest padded length
    batches: list[Batch]
    notes: str | None = None

    @property
    def lengths(self) -> list[int]:
        return [n for b in self.batches for n in b.lengths]

    @property
    def real_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def padded_tokens(self) -> int:
        return int(sum(b.input_ids.numel() for b in self.batches))

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens

    # Single-batch accessors (most workloads are one batch).
    @property
    def input_ids(self) -> torch.Tensor:
        return self.batches[0].input_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.batches[0].attention_mask

    @property
    def token_type_ids(self) -> torch.Tensor | None:
        return self.batches[0].token_type_ids

    @property
    def valid(self) -> torch.Tensor:
        return self.batches[0].valid

    def kwargs(self) -> dict[str, torch.Tensor]:
        return self.batches[0].kwargs()


def profile_lengths(profile: str, batch: int, seq_len: int, seed: int, min_fraction: float = 0.125) -> list[int]:
    """Sequence lengths of a single-batch padding profile (see the module docstring)."""
    if profile == "fixed":
        return [seq_len] * batch
    if profile in FIXED_SHAPE_PROFILES:
        return list(FIXED_SHAPE_PROFILES[profile])
    if profile == "varlen":
        low = max(1, math.ceil(seq_len * min_fraction))
        gen = torch.Generator().manual_seed((seed * 1_000_003 + batch * 1009 + seq_len) & 0x7FFFFFFF)
        lengths = torch.randint(low, seq_len + 1, (batch,), generator=gen).tolist()
        lengths[max(range(batch), key=lambda i: lengths[i])] = seq_len
        return lengths
    raise ValueError(f"profile {profile!r} is not a single-batch profile; expected fixed, varlen, mixed or mixed32")


def cells(profiles: Sequence[str], batch_sizes: Sequence[int], seq_lens: Sequence[int]) -> list[tuple[str, int, int]]:
    """(profile, batch, seq_len) in run order; shape-fixing profiles and suites appear once."""
    out: list[tuple[str, int, int]] = []

    def add(cell: tuple[str, int, int]) -> None:
        if cell not in out:
            out.append(cell)

    for batch in batch_sizes:
        for seq_len in seq_lens:
            for profile in profiles:
                if profile in SUITES:
                    for cell in SUITES[profile]:
                        add(cell)
                elif profile in FIXED_SHAPE_PROFILES:
                    lengths = FIXED_SHAPE_PROFILES[profile]
                    add((profile, len(lengths), max(lengths)))
                elif profile == "corpus":
                    add(("corpus", CORPUS_BATCH, CORPUS_MAX_LENGTH))
                else:
                    add((profile, batch, seq_len))
    return out


def _ids(lengths: Sequence[int], seq_len: int, vocab_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(1, vocab_size, (len(lengths), seq_len), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(list(lengths))[:, None]).long()
    return ids * mask, mask  # id 0 ([PAD] in BERT vocabularies) at padded positions


def make_batch(
    lengths: Sequence[int], seq_len: int, vocab_size: int, seed: int, device: torch.device, token_types: bool = True
) -> Batch:
    """Random ids (seeded) for sequences of ``lengths`` padded to ``seq_len``; ``token_types=False``: no
    ``token_type_ids`` (a model without token types, e.g. DistilBERT)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + len(lengths) * 1009 + seq_len) & 0x7FFFFFFF)
    ids, mask = _ids(lengths, seq_len, vocab_size, gen)
    types = torch.zeros_like(ids).to(device) if token_types else None
    return Batch(list(lengths), ids.to(device), mask.to(device), types)


def make_workload(
    profile: str,
    batch: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    device: torch.device,
    min_fraction: float = 0.125,
    corpus_size: int = 256,
    token_types: bool = True,
    max_length: int = 512,
) -> Workload:
    """The workload of one cell; the shape-fixing profiles override ``batch`` / ``seq_len``.

    ``token_types``: whether the batches carry ``token_type_ids`` (``False`` for a model without them).
    ``max_length``: the model's longest input, where the ``corpus`` profile truncates.
    """
    if profile == "corpus":
        from .corpus import corpus_batches

        batches, notes = corpus_batches(corpus_size, vocab_size, seed, device, max_length=min(seq_len, max_length),
                                        token_types=token_types)  # fmt: skip
        return Workload(profile, sum(len(b.lengths) for b in batches), max(max(b.lengths) for b in batches),
                        batches, notes)  # fmt: skip
    if profile in FIXED_SHAPE_PROFILES:
        batch, seq_len = len(FIXED_SHAPE_PROFILES[profile]), max(FIXED_SHAPE_PROFILES[profile])
    lengths = profile_lengths(profile, batch, seq_len, seed, min_fraction)
    return Workload(profile, batch, seq_len, [make_batch(lengths, seq_len, vocab_size, seed, device, token_types)])


def intermediate_size(config: Any) -> int:
    """The FFN width of ``config``, whatever the family calls it (DistilBERT: ``hidden_dim``)."""
    inter = getattr(config, "intermediate_size", None)
    if inter is not None:
        return int(inter)
    from ..families import FAMILIES

    model_type = getattr(config, "model_type", "bert")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return int(fam.intermediate_size(config))
    raise ValueError(f"model_type {model_type!r}: no intermediate size in its configuration")


def model_flops(config: Any, lengths: Sequence[int], linear_only: bool = False, pooler: bool = True) -> float:
    """Useful FLOPs of one forward on sequences of ``lengths`` (padding excluded).

    Per layer: the four linear layers, 2 N (4 H^2 + 2 H I), and attention, 4 H sum(L_i^2)
    (QK^T and PV); plus the pooler, 2 B H^2 (``pooler=False`` for a model without one: ELECTRA,
    DistilBERT). Softmax, LayerNorm, GELU and embeddings are O(N H) and left out. ``linear_only``:
    the linear layers only (the ``linear-floor`` work). For a multi-batch workload pass all its
    lengths: the sum over batches is the same.
    """
    h, inter, layers = config.hidden_size, intermediate_size(config), config.num_hidden_layers
    n = sum(lengths)
    linear = 2.0 * n * (4 * h * h + 2 * h * inter)
    if linear_only:
        return layers * linear
    attention = 4.0 * h * sum(length * length for length in lengths)
    return layers * (linear + attention) + (2.0 * len(lengths) * h * h if pooler else 0.0)


class PresetConfig:
    """A preset's configuration as plain attributes (no transformers import)."""

    def __init__(self, preset: str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        for k, v in {**PRESET_COMMON, **PRESETS[preset]}.items():
            setattr(self, k, v)
