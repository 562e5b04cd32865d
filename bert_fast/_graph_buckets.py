"""Shape buckets of the CUDA-graph encoder (:mod:`bert_fast.cuda_graphs`): the pure bucketing and
padding math.

A packed batch (N tokens, B sequences, longest ``max_seqlen``) is rounded up to a :class:`Bucket`
by :func:`bucket_for`; :func:`fill_cu_seqlens` writes the bucket's offsets (real sequences, then the
dummy tail, then empty slots); :func:`warmup_lengths` builds synthetic batches that reach every
bucket of a batch shape. No graphs, caches or model state here.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "Bucket",
    "MIN_SEQLEN_BUCKET",
    "TOKEN_LINEAR_MAX",
    "TOKEN_STEP",
    "batch_bucket",
    "bucket_for",
    "dummy_slots",
    "fill_cu_seqlens",
    "seqlen_bucket",
    "token_bucket",
    "warmup_lengths",
]

#: Token counts are rounded to multiples of this up to :data:`TOKEN_LINEAR_MAX`.
TOKEN_STEP = 64
TOKEN_LINEAR_MAX = 512
#: Smallest ``max_seqlen`` bucket.
MIN_SEQLEN_BUCKET = 16


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _token_step(bucket: int) -> int:
    """Width of the token bucket ending at ``bucket`` (``bucket`` minus the previous bucket)."""
    if bucket <= TOKEN_LINEAR_MAX:
        return TOKEN_STEP
    base = 1 << ((bucket - 1).bit_length() - 1)  # largest power of two < bucket
    return base // 4


def token_bucket(n: int) -> int:
    """Packed token count -> graph token count: the next multiple of 64 up to 512, then four
    steps per octave (640, 768, 896, 1024, 1280, ...), so a bucket pads at most 25%."""
    if n < 1:
        raise ValueError(f"token_bucket: n must be >= 1, got {n}")
    if n <= TOKEN_LINEAR_MAX:
        return -(-n // TOKEN_STEP) * TOKEN_STEP
    step = (1 << ((n - 1).bit_length() - 1)) // 4
    return -(-n // step) * step


def seqlen_bucket(max_seqlen: int) -> int:
    """``max_seqlen`` -> the next power of two, at least :data:`MIN_SEQLEN_BUCKET`."""
    return max(MIN_SEQLEN_BUCKET, _next_power_of_2(max_seqlen))


def batch_bucket(n_seqs: int) -> int:
    """Number of sequences (rows, all-padding rows included) -> the next power of two."""
    return _next_power_of_2(max(1, n_seqs))


def dummy_slots(tokens: int, max_seqlen: int) -> int:
    """Sequence slots reserved for the dummy tail of a (``tokens``, ``max_seqlen``) bucket: the
    most padding the bucket can hold (its step minus one) in sequences of <= ``max_seqlen``."""
    return -(-(_token_step(tokens) - 1) // max_seqlen)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """The static shape of one graph."""

    tokens: int  # packed rows the graph computes (real tokens first, then the dummy tail)
    seqs: int  # sequence slots: cu_seqlens has seqs + 1 entries
    max_seqlen: int  # power of two >= every slot's length (the attention grid)


def bucket_for(n_tokens: int, n_seqs: int, max_seqlen: int) -> Bucket:
    """The bucket serving ``n_seqs`` sequences of ``n_tokens`` tokens in all, the longest ``max_seqlen``."""
    if n_tokens < 1 or n_seqs < 1 or max_seqlen < 1:
        raise ValueError(f"bucket_for: empty shape (n_tokens={n_tokens}, n_seqs={n_seqs}, max_seqlen={max_seqlen})")
    tokens = token_bucket(n_tokens)
    length = seqlen_bucket(max_seqlen)
    return Bucket(tokens, batch_bucket(n_seqs) + dummy_slots(tokens, length), length)


def fill_cu_seqlens(
    out: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int, bucket: Bucket, steps: torch.Tensor | None = None
) -> torch.Tensor:
    """Write the bucket's (seqs + 1,) offsets into ``out``: ``cu_seqlens`` (B + 1,) of the real
    sequences, then the dummy tail from ``n_tokens`` to ``bucket.tokens`` in steps of
    ``bucket.max_seqlen``, then empty slots at ``bucket.tokens``. Device ops only (no host sync).

    ``steps``: ``bucket.max_seqlen * arange(1, seqs + 1)`` on ``out``'s device (cached by callers).
    """
    real = cu_seqlens.shape[0]
    if real - 1 + -(-(bucket.tokens - n_tokens) // bucket.max_seqlen) > bucket.seqs:
        raise ValueError(f"fill_cu_seqlens: {real - 1} sequences and {n_tokens} tokens do not fit {bucket}")
    if steps is None:
        steps = torch.arange(1, bucket.seqs + 1, device=out.device, dtype=out.dtype) * bucket.max_seqlen
    out[:real].copy_(cu_seqlens)
    tail = out[real:]
    torch.add(steps[: tail.shape[0]], n_tokens, out=tail)
    tail.clamp_(max=bucket.tokens)
    return out


def _min_in_bucket(bucket: int, floor: int) -> int:
    """Smallest value sharing a power-of-two ``bucket`` whose smallest bucket is ``floor``."""
    return 1 if bucket <= floor else bucket // 2 + 1


def _lengths_for(total: int, rows: tuple[int, int], longest: tuple[int, int]) -> list[int] | None:
    """Row lengths (each >= 1) of ``total`` tokens over a row count in ``rows`` and a longest row in
    ``longest`` (inclusive ranges), the longest row first; ``None`` when none exists."""
    for length in range(longest[1], longest[0] - 1, -1):
        r = max(rows[0], -(-total // length))
        if r > rows[1] or length + r - 1 > total:
            continue
        rest, lengths = total - length - (r - 1), [length]
        for _ in range(r - 1):  # every other row: 1 token plus what is left, up to ``length``
            extra = min(length - 1, rest)
            lengths.append(1 + extra)
            rest -= extra
        return lengths
    return None


def warmup_lengths(batch_size: int, seq_len: int, padded: bool = True) -> list[list[int]]:
    """Row lengths of synthetic batches that reach every bucket a batch of ``batch_size`` rows padded
    to its longest row ``seq_len`` can use, one batch per bucket.

    ``padded=True``: every batch sharing the buckets of (``batch_size``, ``seq_len``), i.e. a row
    count with the same power-of-two bucket, a longest row with the same ``max_seqlen`` bucket, no
    all-padding row, any number of real tokens. ``padded=False``: the full batch only.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"warmup: batch sizes and sequence lengths must be >= 1, got ({batch_size}, {seq_len})")
    if not padded:
        return [[seq_len] * batch_size]
    b_top, l_top = batch_bucket(batch_size), seqlen_bucket(seq_len)
    rows = (_min_in_bucket(b_top, 1), b_top)
    longest = (_min_in_bucket(l_top, MIN_SEQLEN_BUCKET), l_top)
    full = b_top * l_top
    out = []
    n = rows[0] + longest[0] - 1
    while n <= full:
        top = token_bucket(n)
        # Any total inside this token bucket serves; try from its top down.
        for total in range(min(top, full), n - 1, -1):
            lengths = _lengths_for(total, rows, longest)
            if lengths is not None:
                out.append(lengths)
                break
        n = top + 1
    return out
