"""Input validation of the fused forward: every bad input is rejected here, before a kernel runs.

Two input layouts reach the model:

* **padded** — ``input_ids`` / ``inputs_embeds`` of shape (B, L[, H]) with an optional 2D or 4D
  ``attention_mask``: :func:`validate_padded`.
* **packed** — the flattened layout of HF's ``DataCollatorWithFlattening`` and sentence-transformers'
  FlashAttention path: (1, T) ids (or (1, T, H) embeddings), ``position_ids`` restarting at 0 per
  sequence, optional ``cu_seq_lens_q/k`` and ``max_length_q/k``, no mask: :func:`validate_packed`.

Checks that need host values (id ranges, mask values, offsets) synchronize with the device once
per forward; ``validate=False`` skips them for packed input whose offsets are given. While
``torch.compile`` traces the forward they are skipped too (:func:`reads_values`): validation runs in
eager; a compiled model checks shapes, dtypes and devices only, as ``validate_inputs=False`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import transformers

from .kernels import HF_ACTIVATIONS

# --------------------------------------------------------------------------------------------------
# Configuration support
# --------------------------------------------------------------------------------------------------


_UNSET = object()


def check_config(config: transformers.PretrainedConfig, act=_UNSET, act_field: str = "config.hidden_act") -> str:
    """Raise ``NotImplementedError`` naming the field of any configuration we cannot run exactly.

    Returns our activation name for ``config.hidden_act`` (or ``act``, read by the caller from the
    family's own field ``act_field``, e.g. DistilBERT's ``config.activation``).
    """
    if getattr(config, "is_decoder", False):
        raise NotImplementedError("bert_fast supports encoders only: config.is_decoder=True is not supported")
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("bert_fast does not support cross-attention (config.add_cross_attention=True)")
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise NotImplementedError(
            f"bert_fast supports absolute position embeddings only: config.position_embedding_type={pet!r}"
        )
    if act is _UNSET:
        act = getattr(config, "hidden_act", None)
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise NotImplementedError(
            f"bert_fast does not support {act_field}={act!r}; supported: {', '.join(HF_ACTIVATIONS)}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise NotImplementedError(
            f"config.hidden_size={config.hidden_size} is not a multiple of "
            f"config.num_attention_heads={config.num_attention_heads}"
        )
    return HF_ACTIVATIONS[act]


# --------------------------------------------------------------------------------------------------
# Input validation: every bad input is rejected here, before a kernel runs
# --------------------------------------------------------------------------------------------------


def embedding_width(config: transformers.PretrainedConfig) -> int:
    """Width of the word vectors (``inputs_embeds``): ELECTRA's ``embedding_size``, else ``hidden_size``."""
    return int(getattr(config, "embedding_size", None) or config.hidden_size)


def reads_values(validate: bool = True) -> bool:
    """Whether the checks that read device values (id ranges, mask values, offsets) run: in eager
    unless ``validate_inputs=False``; never while ``torch.compile`` traces the forward, where each
    would be a host synchronization and a graph break (a compiled model's inputs are validated by
    running it eagerly, or not at all, as with ``validate_inputs=False``). Checks of shapes, dtypes
    and devices always run."""
    return validate and not torch.compiler.is_compiling()


def valid_from_mask(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """A (B, L) bool tensor of real tokens from a 2D 0/1 mask or a 4D additive/bool mask (its values
    are checked only where :func:`reads_values`)."""
    values = reads_values()
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but the input ids have shape ({batch}, {seq_len})"
            )
        if mask.dtype == torch.bool:
            return mask
        if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            bad = (mask != 0) & (mask != 1)
            if values and bool(bad.any()):
                value = mask[bad].flatten()[0].item()
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (token); found {value!r}. "
                    "Pass a 4D additive mask of shape (batch, 1, 1, seq_len) for additive masking."
                )
            return mask != 0
        raise ValueError(f"attention_mask has unsupported dtype {mask.dtype}")
    if mask.dim() == 4:
        shape_ok = mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[-1] == seq_len
        if not shape_ok or mask.shape[2] not in (1, seq_len):
            raise ValueError(
                f"4D attention_mask must have shape ({batch}, 1, 1, {seq_len}) or ({batch}, 1, {seq_len}, {seq_len}); "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            keep = mask
        elif mask.is_floating_point():
            # HF's additive convention: 0 keeps a key, a large negative value (finfo.min) masks it.
            masked = mask <= -1e4
            if values and bool(((mask != 0) & ~masked).any()):
                raise NotImplementedError(
                    "4D attention_mask with values other than 0 (keep) and a large negative number (mask) is an "
                    "additive bias; the padding-free path supports key padding masks only"
                )
            keep = ~masked
        else:
            raise ValueError(f"4D attention_mask has unsupported dtype {mask.dtype}")
        keep = keep[:, 0]
        if values and keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all()):
            raise NotImplementedError(
                "4D attention_mask varies across query positions; the padding-free path supports key padding "
                "masks only (the same keys for every query)"
            )
        return keep[:, 0]
    raise ValueError(
        f"attention_mask must be 2D (batch, seq_len) or 4D (batch, 1, 1, seq_len); got {mask.dim()}D "
        f"shape {tuple(mask.shape)}"
    )


def check_ids(
    name: str, ids: torch.Tensor, limit: int, limit_name: str, shape: tuple[int, ...], values: bool = True
) -> None:
    """``ids`` is an integer tensor of ``shape``; with ``values``, every id lies in ``[0, limit)``
    (one host synchronization)."""
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {shape}")
    if not values:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) ({limit_name}={limit})")


def check_devices(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}; move them to one device")


class Inputs(NamedTuple):
    """The token inputs of one forward call, as the caller gave them."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    token_type_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None


def _check_lead(
    config: transformers.PretrainedConfig, device: torch.device, x: Inputs, packed: bool
) -> tuple[int, int]:
    """Exactly one of ``input_ids`` / ``inputs_embeds``, shaped for the layout ((B, L[, H]), or
    (1, T[, H]) when ``packed``), not empty, and every given tensor on ``device``: ``(B, L)``."""
    ids, embeds = x.input_ids, x.inputs_embeds
    if (ids is None) == (embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    lead = ids if ids is not None else embeds
    dims = 2 if ids is not None else 3
    width = embedding_width(config)
    if lead.dim() != dims or (packed and lead.shape[0] != 1) or (embeds is not None and lead.shape[-1] != width):
        if packed and ids is not None:
            expected = "packed input (cu_seq_lens_q/k, or position_ids restarting at 0) needs input_ids of shape "
            expected += "(1, total_tokens)"
        elif packed:
            expected = f"packed input needs inputs_embeds of shape (1, total_tokens, {width})"
        elif ids is not None:
            expected = "input_ids must have shape (batch, seq_len)"
        else:
            expected = f"inputs_embeds must have shape (batch, seq_len, {width})"
        raise ValueError(f"{expected}; got {tuple(lead.shape)}")
    batch, seq_len = lead.shape[:2]
    if batch == 0 or seq_len == 0:
        shape = "packed input has 0 tokens" if packed else f"inputs have shape ({batch}, {seq_len})"
        raise ValueError(f"empty batch: {shape}")
    check_devices(
        device,
        input_ids=ids,
        inputs_embeds=embeds,
        attention_mask=x.attention_mask,
        token_type_ids=x.token_type_ids,
        position_ids=x.position_ids,
    )
    return batch, seq_len


def _check_token_ids(config: transformers.PretrainedConfig, x: Inputs, shape: tuple[int, int], values: bool) -> None:
    """``input_ids`` and ``token_type_ids`` (where given): integer, of ``shape``, in range if ``values``."""
    if x.input_ids is not None:
        check_ids("input_ids", x.input_ids, config.vocab_size, "config.vocab_size", shape, values)
    if x.token_type_ids is not None:
        check_ids("token_type_ids", x.token_type_ids, config.type_vocab_size, "config.type_vocab_size", shape, values)


def _check_length(config: transformers.PretrainedConfig, seq_len: int) -> None:
    max_pos = config.max_position_embeddings
    if seq_len > max_pos:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's maximum of {max_pos} "
            f"(config.max_position_embeddings={max_pos})"
        )


def validate_padded(
    config: transformers.PretrainedConfig, default_position_ids: torch.Tensor, device: torch.device, x: Inputs
) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """Check a padded (B, L) call; returns ``(batch, seq_len, position_ids (B, L), valid (B, L) or None)``.

    Id ranges and mask values are checked where :func:`reads_values` (not under ``torch.compile``).
    """
    batch, seq_len = _check_lead(config, device, x, packed=False)
    values = reads_values()
    position_ids = x.position_ids
    if position_ids is None:
        _check_length(config, seq_len)
        position_ids = default_position_ids[:, :seq_len].expand(batch, seq_len)
    else:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() == 2 and position_ids.shape[0] == 1:
            position_ids = position_ids.expand(batch, -1)
        max_pos = config.max_position_embeddings
        check_ids("position_ids", position_ids, max_pos, "config.max_position_embeddings", (batch, seq_len), values)
    _check_token_ids(config, x, (batch, seq_len), values)
    valid = None if x.attention_mask is None else valid_from_mask(x.attention_mask, batch, seq_len)
    return batch, seq_len, position_ids, valid


#: Keyword arguments of HF's flattened (packed) layout, as ``DataCollatorWithFlattening`` sends them.
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def is_packed_by_position_ids(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int
) -> bool:
    """One row, no mask, and ``position_ids`` that read as sequences laid end to end: they start at 0,
    each next position is the previous plus one or a restart at 0, and there is at least one restart
    (what ``DataCollatorWithFlattening`` makes). Any other position ids — arbitrary values given for
    one sequence — keep HF's eager/sdpa meaning: one sequence with those positions.

    Reads the position ids on the host (one synchronization); only consulted when the call gives
    ``position_ids`` for a single row without a mask and without ``cu_seq_lens_q/k``.
    """
    if position_ids is None or attention_mask is not None or batch != 1 or position_ids.numel() < 2:
        return False
    flat = position_ids.reshape(-1)
    if int(flat[0]) != 0:
        return False
    nxt = flat[1:]
    restart = nxt == 0
    return bool(restart.any()) and bool(((nxt == flat[:-1] + 1) | restart).all())


def _as_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of sequence offsets [0, ..., total_tokens] (num_seqs + 1)")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (as flash-attention takes it), got {cu.dtype}; pass .to(torch.int32)")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the model is on {device}; move it to the model's device")
    return cu


def validate_packed(
    config: transformers.PretrainedConfig, device: torch.device, x: Inputs, packed: dict, validate: bool = True
) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """Check a packed call; returns ``(total_tokens, position_ids (T,), cu_seqlens (int32), max_seqlen)``.

    ``packed`` holds the given ``cu_seq_lens_q/k`` and ``max_length_q/k`` (possibly none of them:
    then ``cu_seqlens`` is derived from where ``position_ids`` restart at 0). ``validate=False``
    skips every check that reads device values (offsets, id ranges), so a call that gives
    ``cu_seq_lens_q`` (int32), ``max_length_q`` and ``position_ids`` synchronizes nothing; under
    ``torch.compile`` they are skipped as well (:func:`reads_values`), and such a call traces
    without a graph break. Offsets derived from ``position_ids``, or a longest sequence derived from
    the offsets, are device values read on the host: those calls break a traced graph there.
    """
    _, total = _check_lead(config, device, x, packed=True)
    validate = reads_values(validate)
    attention_mask, position_ids = x.attention_mask, x.position_ids
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (1, total) or (validate and not bool((attention_mask != 0).all())):
            raise ValueError(
                "packed input (cu_seq_lens_q/k) takes no attention_mask (every token is real; the offsets "
                f"separate the sequences); got a mask of shape {tuple(attention_mask.shape)} with padding. "
                "Drop the mask, or pass padded (batch, seq_len) input with a mask instead"
            )
    if position_ids is not None:
        if tuple(position_ids.shape) not in ((1, total), (total,)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected (1, {total})")
        position_ids = position_ids.reshape(total)
    max_pos = config.max_position_embeddings

    cu_q, cu_k = packed.get("cu_seq_lens_q"), packed.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        if position_ids is None:
            raise ValueError("packed input needs cu_seq_lens_q/cu_seq_lens_k or position_ids restarting at 0")
        if bool(position_ids[0] != 0):
            raise ValueError("packed position_ids must start at 0 (each sequence's positions restart at 0)")
        starts = torch.nonzero(position_ids == 0).flatten()
        cu = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    else:
        first = "cu_seq_lens_q" if cu_q is not None else "cu_seq_lens_k"
        cu = _as_cu_seqlens(first, cu_q if cu_q is not None else cu_k, device)
        if cu_q is not None and cu_k is not None:
            _as_cu_seqlens("cu_seq_lens_k", cu_k, device)
            if cu_k.shape != cu_q.shape or (validate and not torch.equal(cu_k, cu_q)):
                raise ValueError(
                    "cu_seq_lens_k differs from cu_seq_lens_q: bert_fast runs self-attention only (the same "
                    "sequences for queries and keys)"
                )
        if validate:
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
                raise ValueError(
                    f"cu_seq_lens_q must start at 0, never decrease and end at the number of tokens ({total}); got "
                    f"{cu.tolist() if cu.numel() <= 16 else '[' + str(int(cu[0])) + ', ..., ' + str(int(cu[-1])) + ']'}"
                )
    max_q, max_k = packed.get("max_length_q"), packed.get("max_length_k")
    if max_q is not None and max_k is not None and int(max_q) != int(max_k):
        raise ValueError(f"max_length_q ({int(max_q)}) != max_length_k ({int(max_k)}): self-attention only")
    given_max = max_q if max_q is not None else max_k
    if given_max is None or validate:
        actual = int((cu[1:] - cu[:-1]).max())
        if given_max is not None and int(given_max) != actual:
            name = "max_length_q" if max_q is not None else "max_length_k"
            raise ValueError(f"{name}={int(given_max)} but the longest sequence in cu_seq_lens_q has {actual} tokens")
        max_seqlen = actual
    else:
        max_seqlen = int(given_max)
    _check_length(config, max_seqlen)
    if position_ids is None:
        # Each token's index in its sequence: its offset minus the start of the sequence holding it
        # (the last start at or before it; an empty sequence's start equals the next one's). No
        # data-dependent shapes, so a traced graph stays whole.
        cu_long = cu.long()
        index = torch.arange(total, device=device)
        position_ids = index - cu_long[torch.searchsorted(cu_long, index, right=True) - 1]
    else:
        check_ids("position_ids", position_ids, max_pos, "config.max_position_embeddings", (total,), validate)
    _check_token_ids(config, x, (1, total), validate)
    return total, position_ids, cu, max_seqlen
