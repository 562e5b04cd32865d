"""Segment pooling over packed (T, hidden) states, for :class:`bert_fast.Encoder`: the modes of
sentence-transformers' ``Pooling`` module, per sequence with ``index_add`` / ``scatter_reduce``
(sums in fp32), with no padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Pooling modes of sentence-transformers' ``Pooling`` module that the Encoder implements.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def _check_modes(pooling: str | Sequence[str]) -> tuple[str, ...]:
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    if not modes:
        raise ValueError(f"pooling must name at least one mode of {POOLING_MODES}")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling={mode!r} is not a known pooling mode; use one of {POOLING_MODES}")
    return modes


def pool_packed(
    h: torch.Tensor, cu: torch.Tensor, lengths: torch.Tensor, modes: tuple[str, ...], skip: int
) -> torch.Tensor:
    """Pool the packed (T, hidden) states per sequence with segment ops; fp32 result (n, dim).

    ``skip``: leading tokens of every sequence left out (a prompt with ``include_prompt=False``,
    as sentence-transformers does; its CLS pooling moves past the prompt when the text is longer).
    """
    dev = h.device
    n, hidden = lengths.numel(), h.shape[-1]
    cu_d, len_d = cu.to(dev), lengths.to(dev)
    starts = cu_d[:-1]
    seg = torch.repeat_interleave(torch.arange(n, device=dev), len_d)
    pos = torch.arange(h.shape[0], device=dev) - torch.repeat_interleave(starts, len_d)
    x, xs, xp, eff = h, seg, pos, len_d
    if skip:
        keep = pos >= skip
        x, xs, xp = h[keep], seg[keep], pos[keep]
        eff = len_d - skip
    x32 = x.float()
    out: list[torch.Tensor] = []
    mean_sum = None
    for mode in modes:
        if mode == "cls":
            first = starts + torch.where(len_d > skip, skip, 0) if skip else starts
            out.append(h[first].float())
        elif mode == "lasttoken":
            out.append(h[cu_d[1:] - 1].float())
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if mean_sum is None:
                mean_sum = torch.zeros(n, hidden, device=dev, dtype=torch.float32).index_add_(0, xs, x32)
            denom = eff.clamp(min=1).to(torch.float32).unsqueeze(1)
            out.append(mean_sum / (denom if mode == "mean" else denom.sqrt()))
        elif mode == "max":
            init = torch.full((n, hidden), float("-inf"), device=dev, dtype=torch.float32)
            out.append(init.scatter_reduce(0, xs.unsqueeze(1).expand(-1, hidden), x32, reduce="amax"))
        elif mode == "weightedmean":
            w = (xp + 1).to(torch.float32)
            num = torch.zeros(n, hidden, device=dev, dtype=torch.float32).index_add_(0, xs, x32 * w.unsqueeze(1))
            den = torch.zeros(n, device=dev, dtype=torch.float32).index_add_(0, xs, w)
            out.append(num / den.clamp(min=1e-9).unsqueeze(1))
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]
