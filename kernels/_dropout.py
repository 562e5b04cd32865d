"""Counter-based dropout masks: the plain-PyTorch oracle of the fused kernels' dropout.

The fused CPU kernels (``csrc/cpu/dropout.h``) decide each element from Philox4x32-10 keyed by a
64-bit seed, with the counter (element index // 4, stream) and word ``index % 4``: an element is kept
when its 32-bit word is >= ``floor(p * 2^32)``, and scaled by ``1 / (1 - p)``. Nothing is stored for
the backward: it regenerates the mask from the same seed. This module computes the same words with
exact integer arithmetic on int64 tensors (every 32 x 32-bit product split into 16-bit halves, so
nothing overflows on any device), which makes the references bit-compatible with the kernels: a
reference given the seed applies exactly the kernel's mask.

Streams and indices (the kernels' convention): attention uses stream ``sequence * heads + head`` and
index ``i * L + j`` over a sequence's L x L probabilities; the residual dropout before
LayerNorm uses stream 0 and index ``row * H + column``.

:func:`draw_seed` takes the seed from PyTorch's default CPU generator, so ``torch.manual_seed``
reproduces a run and activation checkpointing (which restores the RNG state before recomputing a
layer) regenerates the same masks.
"""

from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def draw_seed() -> int:
    """A fresh 63-bit seed from the default CPU generator (one per op call)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def checked_seed(op: str, p: float, seed: int | None) -> int | None:
    """The public functionals' dropout arguments: ``p`` must be in [0, 1) (``ValueError`` naming
    ``op`` otherwise); with ``p > 0`` and no ``seed``, one is drawn (:func:`draw_seed`)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {p}")
    return draw_seed() if p > 0 and seed is None else seed


def threshold(p: float) -> int:
    """Elements whose word is >= this are kept (``floor(p * 2^32)``, as the kernels compute it)."""
    return int(min(p * 4294967296.0, 4294967295.0))


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * m`` for 32-bit ``a`` (int64 tensor) and constant ``m``."""
    a_l, a_h = a & 0xFFFF, a >> 16
    m_l, m_h = m & 0xFFFF, m >> 16
    mid = m_h * a_l + m_l * a_h  # < 2^33
    t = m_l * a_l + ((mid & 0xFFFF) << 16)  # < 2^33
    lo = t & _MASK32
    hi = m_h * a_h + (mid >> 16) + (t >> 32)
    return hi & _MASK32, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the counter words ``c0..c3`` (int64 tensors < 2^32) under key ``(k0, k1)``."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit word (as int64) deciding element ``index`` of ``stream`` (broadcast int64 tensors)."""
    stream, index = torch.broadcast_tensors(stream.long(), index.long())
    block = index >> 2
    c0, c1, c2, c3 = philox4x32(
        block & _MASK32,
        (block >> 32) & _MASK32,
        stream & _MASK32,
        (stream >> 32) & _MASK32,
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )
    word = index & 3
    return torch.where(word == 0, c0, torch.where(word == 1, c1, torch.where(word == 2, c2, c3)))


def keep_mask(seed: int, p: float, stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of the elements ``index`` of ``stream`` at drop probability ``p``."""
    return philox_words(seed, stream, index) >= threshold(p)


def rows_multiplier(seed: int, p: float, rows: int, hidden: int, device, dtype) -> torch.Tensor:
    """(rows, hidden) dropout multipliers (0 or 1 / (1 - p)) of the residual dropout (stream 0)."""
    index = torch.arange(rows * hidden, device=device, dtype=torch.int64).view(rows, hidden)
    keep = keep_mask(seed, p, torch.zeros((), dtype=torch.int64, device=device), index)
    return keep.to(dtype) / (1.0 - p)


def attention_multiplier(seed: int, p: float, lens: torch.Tensor, heads: int, max_len: int, dtype) -> torch.Tensor:
    """(B, heads, max_len, max_len) multipliers of the attention probabilities of sequences of
    lengths ``lens`` (entries outside a sequence are 0)."""
    device = lens.device
    lens = lens.long()
    batch = lens.numel()
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    i = torch.arange(max_len, device=device).view(1, 1, max_len, 1)
    j = torch.arange(max_len, device=device).view(1, 1, 1, max_len)
    L = lens.view(batch, 1, 1, 1)
    keep = keep_mask(seed, p, b * heads + h, i * L + j) & (i < L) & (j < L)
    return keep.to(dtype) / (1.0 - p)
