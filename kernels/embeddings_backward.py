"""Backward of the fused embeddings + LayerNorm (:func:`~bert_fast.kernels.embeddings.embed_layer_norm`).

What is fused: per token, the LayerNorm backward (row recomputed from the ids: the forward saves
only its inputs) and the scatter-add of the row's gradient ``dh`` into the three tables — the
word table at ``input_ids`` (or ``d inputs_embeds = dh`` when vectors were given), the token-type
table at ``token_type_ids`` (row 0 without them) and the position table at ``position_ids`` — plus
the column sums ``dweight = sum dy xhat`` and ``dbias = sum dy``. Unfused, autograd re-runs three
gathers, two adds and the LayerNorm forward, then the LayerNorm backward and three index-put
accumulations over (N, H) intermediates.

With ``xhat = (h - mean) rstd`` and ``g = dy * weight``:
``dh = rstd (g - mean(g) - xhat mean(g xhat))``.

Bytes: read dy and the three gathered rows (4 N H), write dh once (N H, fp32), then read it once
per scatter; the dense (V, H) word gradient is zero-filled first, as autograd's embedding backward
does. FLOPs ~ 15 N H: memory-bound.

Numerics: statistics recomputed in fp32 exactly as the forward computes them (the shifted
two-pass mean/variance, ``eps`` as given); dh, the table gradients and dweight/dbias accumulated in
fp32; the table gradients rounded once to the tables' dtype, dweight/dbias returned in fp32 (the
autograd wrapper casts them to the parameters' dtype).

Kernels:

* C++ (CPU), ``bert_fast::embed_layer_norm_bwd`` (``csrc/cpu/embed_layer_norm_bwd.cpp``): tokens in
  parallel for the LayerNorm part, then the scatter-add parallel over blocks of hidden columns (each
  thread owns whole columns and adds the tokens in order): always deterministic, bitwise the same
  for any thread count.
* Triton: ``_embed_layer_norm_bwd_kernel``, a fixed number of programs each looping over a run of
  tokens with its dweight/dbias partials in registers (reduced by one sum afterwards). The
  scatter-add is either fp32 ``atomic_add`` into the tables from that kernel (fast; the order of
  the additions, so the last bits, vary between runs), or, with ``deterministic=True`` (the
  default when ``torch.are_deterministic_algorithms_enabled()``), a segmented reduction: the token
  indices are sorted by id (stable), and ``_embed_segment_sum_kernel`` runs one program per distinct
  id that sums its tokens' dh rows in token order and writes the table row — no atomics, bitwise
  reproducible. Limits: H <= 4096 (one row in registers), as the forward.
"""

from __future__ import annotations

import torch

from . import _dispatch
from . import _triton_utils as _tu
from ._triton_utils import tl, triton


def _bwd_cpp(grad, ii, pi, ti, we, pe, te, w, b, eps, ie):
    dword, dpos, dtype, dw, db, dembeds = torch.ops.bert_fast.embed_layer_norm_bwd(
        grad, ii, pi, ti, we, pe, te, w, b, float(eps), ie
    )
    return (None if ie is not None else dword), dpos, dtype, dw, db, (dembeds if ie is not None else None)


_bwd_cpp.available = lambda: hasattr(torch.ops.bert_fast, "embed_layer_norm_bwd")  # type: ignore[attr-defined]


def embed_layer_norm_bwd_fake(grad, ii, pi, ti, we, pe, te, w, b, eps, ie=None):
    """Fake (meta) implementation of ``bert_fast::embed_layer_norm_bwd``."""
    h = we.shape[1]
    vec = [we.new_empty((h,), dtype=torch.float32) for _ in range(2)]
    dword = we.new_empty((0, h)) if ie is not None else we.new_empty(we.shape)
    dembeds = ie.new_empty(ie.shape) if ie is not None else we.new_empty((0, h))
    return dword, pe.new_empty(pe.shape), te.new_empty(te.shape), *vec, dembeds


# --- Triton kernels ------------------------------------------------------------------------------


@_tu.jit
def _embed_layer_norm_bwd_kernel(
    G,  # pointer to the gradient of the output, shape (N, H), unit column stride
    InputIds,  # pointer to the word ids, shape (N,), int32/int64; read iff not HAS_INPUTS_EMBEDS
    InputsEmbeds,  # pointer to the given word vectors, shape (N, H); read iff HAS_INPUTS_EMBEDS
    PositionIds,  # pointer to the position ids, shape (N,), int32/int64
    TokenTypeIds,  # pointer to the token type ids, shape (N,); read iff HAS_TOKEN_TYPES
    WordEmb,  # pointer to the word table, shape (V, H), unit column stride
    PosEmb,  # pointer to the position table, shape (P, H), unit column stride
    TypeEmb,  # pointer to the token type table, shape (T, H), unit column stride
    W,  # pointer to the LayerNorm weight, shape (H,)
    DH,  # pointer to the gradient of the summed row, fp32, shape (N, H), contiguous
    DWord,  # pointer to the word table gradient, fp32, shape (V, H), contiguous; iff ATOMIC and ids used
    DPos,  # pointer to the position table gradient, fp32, shape (P, H), contiguous; iff ATOMIC
    DType,  # pointer to the token type table gradient, fp32, shape (T, H), contiguous; iff ATOMIC
    Partial,  # pointer to per-program partial column sums, fp32, shape (programs, 2, H): dweight, dbias
    stride_g_row,
    stride_inputs_embeds_row,
    stride_word_row,
    stride_pos_row,
    stride_type_row,
    n_rows,
    n_cols,
    rows_per_program,
    eps,
    HAS_INPUTS_EMBEDS: tl.constexpr,
    HAS_TOKEN_TYPES: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid, cols, mask, w = _tu.row_program(W, n_cols, BLOCK_H)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid * rows_per_program + i
        r = tl.where(row < n_rows, row, 0)  # ids of row 0 stand in for rows past the end (nothing stored)
        rmask = cols < tl.where(row < n_rows, n_cols, 0)
        # ids widened to int64 before the row offset (V * H may exceed 2^31)
        if HAS_INPUTS_EMBEDS:
            word_ptr = InputsEmbeds + r * stride_inputs_embeds_row
        else:
            word_id = tl.load(InputIds + r).to(tl.int64)
            word_ptr = WordEmb + word_id * stride_word_row
        if HAS_TOKEN_TYPES:
            type_id = tl.load(TokenTypeIds + r).to(tl.int64)
        else:
            type_id = 0
        pos_id = tl.load(PositionIds + r).to(tl.int64)
        # the forward's row and statistics: (word + type) + position in fp32, shifted two-pass
        h = tl.load(word_ptr + cols, mask=rmask, other=0.0).to(tl.float32)
        h += tl.load(TypeEmb + type_id * stride_type_row + cols, mask=rmask, other=0.0).to(tl.float32)
        h += tl.load(PosEmb + pos_id * stride_pos_row + cols, mask=rmask, other=0.0).to(tl.float32)
        shift = tl.sum(tl.where(cols == 0, h, 0.0), axis=0)
        hs = tl.where(rmask, h - shift, 0.0)
        mean_s = tl.sum(hs, axis=0) / n_cols
        diff = tl.where(rmask, hs - mean_s, 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / n_cols + eps)  # eps as given
        # rows past the end: dy = 0, so dh = 0 and they add exactly 0 to the column sums
        dy = tl.load(G + r * stride_g_row + cols, mask=rmask, other=0.0).to(tl.float32)
        xhat, dh = _tu.layer_norm_row_bwd(dy, w, diff, rstd, rmask, n_cols)
        tl.store(DH + row * n_cols + cols, dh, mask=rmask)
        dw += dy * xhat
        db += dy
        if ATOMIC:
            if not HAS_INPUTS_EMBEDS:
                tl.atomic_add(DWord + word_id * n_cols + cols, dh, mask=rmask, sem="relaxed")
            tl.atomic_add(DType + type_id * n_cols + cols, dh, mask=rmask, sem="relaxed")
            tl.atomic_add(DPos + pos_id * n_cols + cols, dh, mask=rmask, sem="relaxed")
    base = Partial + pid * 2 * n_cols
    tl.store(base + cols, dw, mask=mask)
    tl.store(base + n_cols + cols, db, mask=mask)


@_tu.jit
def _embed_segment_sum_kernel(
    DH,  # pointer to the gradient rows, fp32, shape (N, H), contiguous
    Order,  # pointer to the token indices sorted by id (stable), int64, shape (N,)
    SegStart,  # pointer to the segment offsets into Order, int64, shape (segments + 1,)
    SegId,  # pointer to the table row of each segment, int64, shape (segments,)
    Out,  # pointer to the table gradient, fp32, shape (rows, H), contiguous, zero-filled
    n_cols,
    BLOCK_H: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    lo = tl.load(SegStart + seg)
    hi = tl.load(SegStart + seg + 1)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(lo, hi):  # this id's tokens in token order: a fixed summation order
        t = tl.load(Order + i)
        acc += tl.load(DH + t * n_cols + cols, mask=mask, other=0.0)
    tl.store(Out + tl.load(SegId + seg) * n_cols + cols, acc, mask=mask)


def _segment_sum(dh: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """``out[ids[t]] += dh[t]`` deterministically: stable sort by id, one program per distinct id."""
    sorted_ids, order = torch.sort(ids.to(torch.int64), stable=True)
    seg_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.zeros(seg_ids.numel() + 1, dtype=torch.int64, device=dh.device)
    torch.cumsum(counts, 0, out=starts[1:])
    _embed_segment_sum_kernel[(seg_ids.numel(),)](
        dh, order, starts, seg_ids, out, dh.shape[1], BLOCK_H=block, num_warps=_warps(block), num_stages=1,
    )  # fmt: skip


def _warps(block: int) -> int:
    """4 warps, or the nearest count :func:`~bert_fast.kernels._triton_utils.row_warps` allows for the
    block (one stage, as the row kernels). Checked with ptxas for sm_80/sm_90a (:func:`aot_specs`):
    no spills, where e.g. 8 warps at BLOCK_H 1024 spill 8 bytes on sm_80."""
    if _tu.interpreting():
        return _tu.INTERPRET_ROW_WARPS
    allowed = _tu.row_warps(block)
    return min(allowed[-1], max(allowed[0], 4))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def embed_layer_norm_bwd_triton(grad, ii, pi, ti, we, pe, te, w, b, eps, ie, *, deterministic: bool | None = None):
    """Triton backward: ``(dword, dpos, dtype, dweight, dbias, dinputs_embeds)``.

    Table gradients in the tables' dtype (``dword`` ``None`` when ``inputs_embeds`` was given,
    ``dinputs_embeds`` ``None`` when not), dweight/dbias fp32. ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) picks the sorted segmented reduction over
    atomics for the scatter-add.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    word, pos, types = _rows(we), _rows(pe), _rows(te)
    g2 = _rows(grad)
    embeds = _rows(ie) if ie is not None else None
    n_rows, n_cols = g2.shape
    dev = g2.device
    dh = torch.empty((n_rows, n_cols), dtype=torch.float32, device=dev)
    dword = torch.zeros(word.shape, dtype=torch.float32, device=dev) if embeds is None else None
    dpos = torch.zeros(pos.shape, dtype=torch.float32, device=dev)
    dtype_ = torch.zeros(types.shape, dtype=torch.float32, device=dev)
    programs = max(1, min(n_rows, 8 if _tu.interpreting() else 1024))
    rows_per_program = triton.cdiv(max(n_rows, 1), programs)
    partial = torch.zeros((programs, 2, n_cols), dtype=torch.float32, device=dev)
    block = max(_tu.next_power_of_2(n_cols), 16)
    if n_rows:
        pos_ids = pi.contiguous()
        args = (
            g2, ii.contiguous() if ii is not None else pos_ids, embeds if embeds is not None else word, pos_ids,
            ti.contiguous() if ti is not None else pos_ids, word, pos, types, w.contiguous(), dh,
            dword if dword is not None else dpos, dpos, dtype_, partial,
            g2.stride(0), embeds.stride(0) if embeds is not None else 0, word.stride(0), pos.stride(0),
            types.stride(0), n_rows, n_cols, rows_per_program, float(eps),
        )  # fmt: skip
        with _tu.device_guard(dev):
            _embed_layer_norm_bwd_kernel[(programs,)](
                *args, HAS_INPUTS_EMBEDS=embeds is not None, HAS_TOKEN_TYPES=ti is not None,
                ATOMIC=not deterministic, BLOCK_H=block, num_warps=_warps(block), num_stages=1,
            )  # fmt: skip
            if deterministic:
                if dword is not None:
                    _segment_sum(dh, ii, dword, block)
                _segment_sum(dh, ti if ti is not None else torch.zeros_like(pos_ids), dtype_, block)
                _segment_sum(dh, pos_ids, dpos, block)
    sums = partial.sum(0)
    dembeds = dh.to(embeds.dtype) if embeds is not None else None
    dt = word.dtype
    return (dword.to(dt) if dword is not None else None), dpos.to(dt), dtype_.to(dt), sums[0], sums[1], dembeds


_dispatch.register_cpp_fake("embed_layer_norm_bwd", embed_layer_norm_bwd_fake)

BACKWARD = {"triton": embed_layer_norm_bwd_triton, "cpp": {"cpu": _bwd_cpp}}


def embed_layer_norm_backward(grad, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                              token_type_embeddings, weight, bias, eps, inputs_embeds=None, *, backend: str,
                              deterministic: bool | None = None) -> tuple:
    """Gradients of :func:`embed_layer_norm` by ``backend``'s kernel (``"triton"``, or ``"cpp"`` on CPU).

    Returns ``(dword, dpos, dtype, dweight, dbias, dinputs_embeds)`` (see the module docstring);
    ``deterministic`` applies to Triton (the C++ kernel is always deterministic).
    """
    args = (grad.contiguous(), input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
            token_type_embeddings, weight, bias, float(eps), inputs_embeds)  # fmt: skip
    if backend == "triton":
        return embed_layer_norm_bwd_triton(*args, deterministic=deterministic)
    if backend == "cpp" and word_embeddings.device.type == "cpu":
        return _bwd_cpp(*args)
    raise ValueError(f"embed_layer_norm backward: no {backend!r} kernel on {word_embeddings.device.type}")


def aot_specs() -> list[dict]:
    """Every specialization the backward launcher can choose, for an ahead-of-time compile check
    (same format as :func:`~bert_fast.kernels.embeddings.aot_specs`; ``{dt}`` the table dtype,
    ``{it}`` the id dtype)."""
    sig = {
        "G": "*{dt}", "InputIds": "*{it}", "InputsEmbeds": "*{dt}", "PositionIds": "*{it}", "TokenTypeIds": "*{it}",
        "WordEmb": "*{dt}", "PosEmb": "*{dt}", "TypeEmb": "*{dt}", "W": "*{dt}", "DH": "*fp32", "DWord": "*fp32",
        "DPos": "*fp32", "DType": "*fp32", "Partial": "*fp32", "stride_g_row": "i32",
        "stride_inputs_embeds_row": "i32", "stride_word_row": "i32", "stride_pos_row": "i32",
        "stride_type_row": "i32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", "eps": "fp32",
    }  # fmt: skip
    seg_sig = {"DH": "*fp32", "Order": "*i64", "SegStart": "*i64", "SegId": "*i64", "Out": "*fp32", "n_cols": "i32"}
    specs = []
    for block in _tu.ROW_BLOCKS:
        warps = _warps(block)
        for embeds in (False, True):
            for types in (False, True):
                # every block with the heaviest variant (both optional inputs: most live registers);
                # the lighter ones at BERT's row blocks (hidden 384..1024), as the forward's specs do
                if not (embeds and types) and block not in (512, 1024):
                    continue
                for atomic in (False, True):
                    specs.append({
                        "label": f"embed_layer_norm_bwd BLOCK_H={block} embeds={embeds} types={types} atomic={atomic}",
                        "kernel": _embed_layer_norm_bwd_kernel, "signature": sig,
                        "constexprs": {"HAS_INPUTS_EMBEDS": embeds, "HAS_TOKEN_TYPES": types, "ATOMIC": atomic,
                                       "BLOCK_H": block},
                        "num_warps": warps, "num_stages": 1,
                    })  # fmt: skip
        specs.append({"label": f"embed_segment_sum BLOCK_H={block}", "kernel": _embed_segment_sum_kernel,
                      "signature": seg_sig, "constexprs": {"BLOCK_H": block}, "num_warps": warps, "num_stages": 1,
                      "dtypes": ("fp32",)})  # fmt: skip
    return specs
