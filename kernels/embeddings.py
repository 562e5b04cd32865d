"""Fused embeddings + LayerNorm on packed tokens.

For each of the N real (non-padding) tokens: gather the word row (or take ``inputs_embeds``), add
the token-type row and the position row, LayerNorm the sum — one pass, one (N, H) write. Unfused,
HF materializes three (B, L, H) gathers, two sums and the LayerNorm over *padded* positions.
Bytes: 3 N H gathered + N H written (vs about 9 B L H unfused). Memory-bound.

Order of the sum is HF's: ``(word + token_type) + position``. LayerNorm statistics in fp32,
``eps`` exactly as given. ``token_type_ids=None`` means type 0 for every token (HF's default).

Backends: ``torch`` (:func:`embed_layer_norm_ref`), ``triton``, ``cpp``; reference backward under
autograd for the fused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._autograd import fast_forward_ref_backward


def embed_layer_norm_ref(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    inputs_embeds: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch. ids: (N,) int; ``inputs_embeds``: (N, H) instead of ``input_ids``."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("embed_layer_norm: give input_ids or inputs_embeds")
        inputs_embeds = F.embedding(input_ids, word_embeddings)
    if token_type_ids is None:
        tt = token_type_embeddings[0].expand_as(inputs_embeds)
    else:
        tt = F.embedding(token_type_ids, token_type_embeddings)
    pos = F.embedding(position_ids, position_embeddings)
    dtype = inputs_embeds.dtype
    if upcast:
        inputs_embeds, tt, pos = inputs_embeds.float(), tt.float(), pos.float()
        weight, bias = weight.float(), bias.float()
    h = inputs_embeds + tt
    h = h + pos
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps).to(dtype)


def _triton_support(inputs_embeds: torch.Tensor | None) -> str | None:
    if globals().get("embed_layer_norm_fwd") is None:
        return "Triton kernel not available in this build"
    return None


def embed_layer_norm(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    inputs_embeds: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embeddings + LayerNorm for packed tokens; returns (N, H) in the embeddings' dtype.

    Ids are not range-checked here (a kernel cannot raise); callers validate them first.
    """
    device = word_embeddings.device
    be = _backend.resolve("embed_layer_norm", device, backend, supports={"triton": _triton_support(inputs_embeds)})
    args = (
        input_ids,
        position_ids,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        weight,
        bias,
        inputs_embeds,
    )

    def ref(ii, pi, ti, we, pe, te, w, b, ie):
        return embed_layer_norm_ref(ii, pi, ti, we, pe, te, w, b, eps, inputs_embeds=ie)

    if be == "torch":
        return ref(*args)
    if be == "triton":

        def fast(ii, pi, ti, we, pe, te, w, b, ie):
            return embed_layer_norm_fwd(ii, pi, ti, we, pe, te, w, b, eps, ie)  # noqa: F821

    else:
        from . import _cpp

        def fast(ii, pi, ti, we, pe, te, w, b, ie):
            return _cpp.embed_layer_norm(ii, pi, ti, we, pe, te, w, b, eps, ie)

    if _backend.needs_grad(*args):
        return fast_forward_ref_backward(fast, ref, *args)
    return fast(*args)


# --- Triton kernels (issue 3) -------------------------------------------------------------------
