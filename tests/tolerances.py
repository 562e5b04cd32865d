"""The one tolerance table of the test suite (DESIGN.md §5)."""

from __future__ import annotations

import torch

#: fp32 against the fp32 reference, max abs diff.
FP32_OP_ATOL = 1e-5  # LayerNorm / GELU / embeddings sized ops
FP32_ATTN_ATOL = 1e-4  # through attention
FP32_MODEL_ATOL = 1e-4  # whole models, valid tokens only

#: Half precision: max|ours - ref32| <= FACTOR * max|torch_same_dtype - ref32| + FLOOR.
HALF_OP_FACTOR = 2.0
HALF_MODEL_FACTOR = 3.0
HALF_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

#: sentence embeddings with and without bert_fast, real checkpoint.
EMBEDDING_MIN_COSINE = 0.99999


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_close_fp32(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values in output"
    err = max_abs(ours, ref)
    assert err <= atol, f"{what}: max abs diff {err:.3e} > {atol:.1e}"


def assert_half_rule(
    ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref32: torch.Tensor, factor: float, what: str = ""
) -> None:
    """The flash-attention rule: our error at most ``factor`` times PyTorch's own, plus a floor."""
    assert torch.isfinite(ours.float()).all(), f"{what}: non-finite values in output"
    ours_err = max_abs(ours, ref32)
    torch_err = max_abs(torch_same_dtype, ref32)
    bound = factor * torch_err + HALF_FLOOR[ours.dtype]
    assert ours_err <= bound, (
        f"{what}: ours vs fp32 ref {ours_err:.3e} > {factor} x torch-{ours.dtype} vs fp32 ref {torch_err:.3e} "
        f"+ floor {HALF_FLOOR[ours.dtype]:.0e}"
    )
