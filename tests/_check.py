"""What every op test shares: where a backend can run, one comparison rule, output poisoning.

* :func:`backend_skip_reason` says why a backend cannot run a case here (``None`` when it can):
  ``cpp`` needs the extension ``bert_fast._C`` with a kernel for the device; ``triton`` needs CUDA
  or the Triton interpreter, and the interpreter cannot be trusted with bf16 (DESIGN.md §4).
* :func:`check_op` compares one output with the ``_ref`` oracle by the tolerance table
  (``tests/tolerances.py``, DESIGN.md §5): fp32 against an absolute bound; fp16/bf16 against the
  fp32 (or fp64) reference, allowed ``factor`` times PyTorch's own error in the same dtype plus a
  floor, with both errors in the failure message.
* :func:`assert_grads_match_torch` compares a fused op's forward and gradients under autograd with
  the ``torch`` backend's; :func:`bert_cases` builds the gpu tier's BERT-shaped parameters.
* :func:`assert_left_padding_and_embeds` is the one model-level check shared by the model tests.
* :func:`poisoned` NaN-fills every uninitialized allocation, so an output element a kernel never
  writes fails the comparison (the interpreter raises nothing on out-of-bounds accesses).

Only public surfaces are used: ``bert_fast.kernels.<op>(..., backend=...)``, the ``<op>_ref``
oracles and the registered ``torch.ops.bert_fast.*`` operators.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from bert_fast.kernels import _backend
from tolerances import FP32_MODEL_ATOL, HALF_OP_FACTOR, assert_close_fp32, assert_half_rule

#: The backends every op test is parametrized over.
BACKENDS = ("torch", "cpp", "triton")

#: Every operator the C++ extension registers as ``torch.ops.bert_fast.<name>``.
CPP_OPS = _backend.CPP_OPS

HAS_CUDA = torch.cuda.is_available()

#: Where the CPU-tier cases run: the GPU when there is one (compiled kernels), else the CPU.
DEVICE = "cuda" if HAS_CUDA else "cpu"

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, *HALF)

#: Hidden sizes the row ops (LayerNorms) are tested at: odd (partly masked rows), TinyBERT's 312
#: (not a multiple of 16), MiniLM's 384, BERT-base's 768.
ROW_HIDDENS = (37, 312, 384, 768)

#: BERT's shapes for the gpu tier: name -> (hidden, heads), head_dim 64.
BERT_SHAPES = {"base": (768, 12), "large": (1024, 16)}


@functools.cache
def importable(module: str) -> bool:
    """Does ``import <module>`` succeed here (any failure counts as no)?"""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def cpp_built() -> bool:
    """Is the C++ extension importable (it registers ``torch.ops.bert_fast.*`` on import)?"""
    return importable("bert_fast._C")


def cpp_has_kernel(op: str, device: str | torch.device) -> bool:
    """Does ``torch.ops.bert_fast.<op>`` have a kernel for ``device`` (CPU always, CUDA when built so)?"""
    if not cpp_built():
        return False
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bert_fast::{op}", key)


def triton_importable() -> bool:
    return importable("triton.language")


def interpreting() -> bool:
    """Triton kernels run under the interpreter (set by tests/conftest.py when there is no CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_skip_reason(
    backend: str, dtype: torch.dtype | None = None, device: str | torch.device = DEVICE, op: str | None = None
) -> str | None:
    """Why ``backend`` cannot run a case of ``op`` in ``dtype`` on ``device`` here; ``None`` when it can."""
    device = torch.device(device)
    if backend == "cpp":
        if not cpp_built():
            return "bert_fast._C is not built (pip install --no-build-isolation -e . builds it)"
        if op is not None and not cpp_has_kernel(op, device):
            return f"bert_fast._C has no {device.type} kernel for {op}"
        if device.type == "cuda" and op is None and not cpp_has_kernel("bias_act", device):
            return "bert_fast._C was built without CUDA kernels"
    elif backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cpu":
            if not interpreting():
                return "triton needs CUDA tensors, or TRITON_INTERPRET=1 on CPU"
            if dtype == torch.bfloat16:
                return "the Triton interpreter's bf16 dots and stores are not faithful (DESIGN.md §4): bf16 runs on GPU"
    return None


def upcast(args: Sequence[Any], dtype: torch.dtype = torch.float32) -> list[Any]:
    """Floating-point tensors of ``args`` converted to ``dtype``; everything else unchanged."""
    return [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def check_op(
    ours: torch.Tensor,
    ref: Callable[..., torch.Tensor],
    args: Sequence[Any],
    *,
    atol: float,
    what: str,
    factor: float = HALF_OP_FACTOR,
    oracle: torch.dtype = torch.float32,
) -> None:
    """``ours`` against ``ref(*args)`` by the tolerance table.

    ``ref`` is the op's ``_ref`` oracle taking ``args``. The oracle runs on ``args`` upcast to
    ``oracle`` (fp32, or fp64 on the GPU where the fp32 reference would carry reduced-precision
    GEMM error). fp32 outputs: max abs diff <= ``atol``. fp16/bf16 outputs:
    ``max|ours - ref32| <= factor * max|ref_in_same_dtype - ref32| + floor``.
    """
    assert torch.is_tensor(ours), f"{what}: expected a tensor, got {type(ours).__name__}"
    same = ref(*args)
    assert ours.dtype == same.dtype, f"{what}: dtype {ours.dtype} != reference dtype {same.dtype}"
    assert ours.shape == same.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(same.shape)}"
    assert ours.device == same.device, f"{what}: device {ours.device} != {same.device}"
    if ours.dtype == torch.float32 and oracle == torch.float32:
        ref_hi = same  # the oracle itself: no second evaluation
    else:
        ref_hi = ref(*upcast(args, oracle)).float()
    if ours.dtype == torch.float32:
        assert_close_fp32(ours, ref_hi, atol, what)
    else:
        assert_half_rule(ours, same, ref_hi, factor, what)


def assert_grads_match_torch(
    run: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], backend: str, atol: float, grad_atol: float = 1e-6
) -> None:
    """``run(backend, *inputs)`` under autograd against ``run("torch", *inputs)`` (fp32): the outputs
    within ``atol``, the gradient of every input (for a ramp ``grad_out``) within ``grad_atol``."""

    def grads(be):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = run(be, *leaves)
        g = torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1], device=out.device)
        return out.detach(), torch.autograd.grad(out, leaves, g)

    out_f, g_f = grads(backend)
    out_r, g_r = grads("torch")
    assert_close_fp32(out_f, out_r, atol, f"{backend} forward")
    assert len(g_f) == len(g_r) == len(inputs)
    for i, (a, r) in enumerate(zip(g_f, g_r)):
        assert_close_fp32(a, r, grad_atol, f"{backend}: gradient {i}")


def bert_cases(variants: Sequence[Any], quick: Any = None, label: Callable[[Any], str] = str) -> list:
    """The gpu tier's ``(dtype, model, *variant)`` parameters: every dtype x BERT shape x variant (a
    value, or a tuple of values), each ``gpu``-marked; the ``quick`` variant (default: the first) on
    BERT-base is also ``gpu_quick``. Ids: ``<model>-<label(variant)>-<dtype>``."""
    import pytest

    quick = variants[0] if quick is None else quick
    cases = []
    for dtype in DTYPES:
        for model in BERT_SHAPES:
            for variant in variants:
                values = variant if isinstance(variant, tuple) else (variant,)
                marks = [pytest.mark.gpu, *([pytest.mark.gpu_quick] if (model, variant) == ("base", quick) else [])]
                name = f"{model}-{label(variant)}-{str(dtype)[6:]}"
                cases.append(pytest.param(dtype, model, *values, marks=marks, id=name))
    return cases


def assert_left_padding_and_embeds(ref, ours, ids: torch.Tensor, mask: torch.Tensor, field: str, **kw) -> None:
    """A left-padded batch through the reference and our model (output ``field`` compared on valid
    tokens, fp32), then the same batch as ``inputs_embeds`` through both base models."""
    base_ref, base_ours = ref.base_model, ours.base_model
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, **kw)
        b = ours(ids, attention_mask=mask, **kw)
        emb = base_ref.embeddings.word_embeddings(ids)
        c = base_ref(inputs_embeds=emb, attention_mask=mask)
        d = base_ours(inputs_embeds=emb, attention_mask=mask)
    valid = mask.bool()
    assert valid[:, -1].all(), "not a left-padded batch (every row's last token is real)"
    assert_close_fp32(getattr(b, field)[valid], getattr(a, field)[valid], FP32_MODEL_ATOL, "left padding")
    assert_close_fp32(d.last_hidden_state[valid], c.last_hidden_state[valid], FP32_MODEL_ATOL, "inputs_embeds")


@contextlib.contextmanager
def poisoned(device: str | torch.device = DEVICE) -> Iterator[None]:
    """NaN-fill every ``torch.empty`` (deterministic mode's ``fill_uninitialized_memory``)."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        probe = torch.empty(8, device=device)
        assert torch.isnan(probe).all(), "poisoning is not active: an unwritten element could pass"
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def packed_lengths(lens: Sequence[int], device: str | torch.device = DEVICE) -> torch.Tensor:
    """``cu_seqlens`` (B + 1,) int32 of the given sequence lengths."""
    return torch.tensor([0, *torch.tensor(list(lens), dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def bert_lengths(batch: int, max_len: int) -> list[int]:
    """Random lengths with the edge cases in: a full-length row, a length-1 row, an empty row."""
    g = torch.Generator().manual_seed(batch * 1000 + max_len)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g).tolist()
    lens[0], lens[1 % batch], lens[-1] = max_len, 1, 0
    return lens


def usable_dtypes(backend: str, device: str | torch.device = DEVICE, dtypes: Sequence[torch.dtype] = DTYPES) -> list:
    """The ``dtypes`` that ``backend`` can run on ``device`` here (for fuzzing strategies)."""
    return [d for d in dtypes if backend_skip_reason(backend, d, device) is None]


def fuzz_settings(backend: str, device: str | torch.device = DEVICE, max_examples: int = 25):
    """Hypothesis settings for one op x backend: bounded examples (fewer under the slow Triton
    interpreter), no deadline (first calls compile), no example database written into the tree.

    The examples are derandomized (the same every run), so a CI result is reproducible; set
    ``BERT_FAST_FUZZ=explore`` to draw fresh random examples (and ``BERT_FAST_FUZZ_EXAMPLES=N`` for
    more of them) when hunting for bugs."""
    from hypothesis import settings

    explore = os.environ.get("BERT_FAST_FUZZ", "") == "explore"
    max_examples = int(os.environ.get("BERT_FAST_FUZZ_EXAMPLES", max_examples))
    if backend == "triton" and torch.device(device).type == "cpu" and "BERT_FAST_FUZZ_EXAMPLES" not in os.environ:
        max_examples = min(max_examples, 10)
    return settings(
        max_examples=max_examples, deadline=None, database=None, print_blob=True, derandomize=not explore
    )


def skip_unless_cpp(device: str | torch.device = "cpu") -> None:
    """Skip the calling test when the C++ extension cannot run on ``device`` here."""
    import pytest

    reason = backend_skip_reason("cpp", device=device)
    if reason is not None:
        pytest.skip(reason)


def skip_unless_triton(device: str | torch.device = DEVICE) -> None:
    """Skip the calling test when the Triton kernels cannot run on ``device`` here."""
    import pytest

    reason = backend_skip_reason("triton", device=device)
    if reason is not None:
        pytest.skip(reason)


def load_cpp_ops() -> None:
    """Make ``torch.ops.bert_fast.*`` fully usable (kernels and fake implementations) the way a
    user gets them: through one public ``cpp`` call. Skips the calling test without the extension."""
    skip_unless_cpp()
    import bert_fast.kernels as K

    K.bias_act(torch.zeros(1, 1), None, "relu", backend="cpp")


def layer_norm_condition(h: torch.Tensor) -> float:
    """How much a LayerNorm of the rows of ``h`` amplifies rounding of its inputs: the largest
    ``max|h| / std(h)`` over rows (about 2-4 for random rows; huge for nearly constant ones, where
    fp32 implementations legitimately differ by more than the table's absolute bound)."""
    if h.numel() == 0:
        return 1.0
    h = h.double().reshape(-1, h.shape[-1])
    std = h.var(-1, unbiased=False).sqrt()
    return float((h.abs().amax(-1) / std.clamp_min(1e-300)).max())


def fp32_bound_for_layer_norm(h: torch.Tensor, atol: float) -> float:
    """The table's fp32 bound, widened for ill-conditioned rows (relative to a well-conditioned 4)."""
    return atol * max(1.0, layer_norm_condition(h) / 4.0)
