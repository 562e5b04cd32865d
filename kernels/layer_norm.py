"""Fused bias + residual + LayerNorm: ``y = LayerNorm(x + linear_bias + residual) * weight + bias``.

Where it sits in BERT: after the attention output projection and after the FFN output
projection, HF computes ``LayerNorm(dropout(dense(x)) + residual)``. In eval mode dropout is the
identity, so we run the GEMM *without* its bias and fold bias add, residual add and the whole
LayerNorm into one pass over the row.

Bytes: unfused, HF reads/writes the (N, H) activation about 5 times (bias add, residual add,
LayerNorm reads twice and writes once); fused, we read x and residual once and write y once:
3 N H elements plus 3 H for the parameters. FLOPs (~8 N H) are negligible: the op is memory-bound.

Numerics: statistics (mean, biased variance) in fp32 whatever the input dtype; ``eps`` is used
exactly as given (BERT uses 1e-12, which is below fp16's resolution: it must not be clamped).

Triton kernel (:func:`bias_residual_layer_norm_fwd`): one program per row, the whole row in
registers (``BLOCK_H`` = next power of two >= H, masked), so x and the residual are read exactly
once; two-pass mean/variance from registers (no E[x^2] - E[x]^2 cancellation). Limits: H <= 4096
(larger rows would spill), fp16/bf16/fp32 activations (parameters may be any of these too), unit
stride along H (other layouts are copied first), any number of leading dims. The warp count is
autotuned per row block and hidden size on the GPU (configs: :func:`_triton_utils.row_configs`).

Backends: ``torch`` (:func:`bias_residual_layer_norm_ref`), ``triton``, ``cpp``. Backward (under
autograd, :func:`~bert_fast.kernels._autograd.fused_backward`): ``_bias_residual_layer_norm_bwd_kernel``
(Triton) and ``bert_fast::bias_residual_layer_norm_bwd`` (C++, CPU): one pass per row recomputes the
statistics from the saved inputs and writes ``dh = rstd (g - mean(g) - xhat mean(g xhat))``,
``g = dy * weight`` (which is dx and d-residual); dweight, dbias and d-linear-bias are fp32 partial
column sums per block of rows, reduced afterwards (deterministic). The C++ backend on CUDA has no
backward kernel and uses the reference backward.

Dropout (training): ``dropout_p > 0`` computes HF's ``LayerNorm(dropout(x + linear_bias) + residual)``
with the mask drawn from ``seed`` (:mod:`~bert_fast.kernels._dropout`: counter-based, stream 0, index
``row * H + column``). The C++ kernels (``bert_fast::bias_residual_layer_norm_dropout`` and the
backward op) generate the mask per row in registers-sized chunks; the Triton kernels (constexpr
``DROPOUT``: the variants without it compile as before) generate it in registers with ``tl.philox``
(:func:`~bert_fast.kernels._triton_utils.dropout_keep`). Both regenerate it in the backward: no mask
tensor is written or stored (HF keeps a one-byte mask per element for backward), and the separate
dropout pass over the activation (read and write N H elements, plus the mask) disappears. Cost: one
Philox4x32-10 (10 rounds of two 32 x 32-bit multiplies) per element, in the forward and again in the
backward, which then writes d-residual (= dh) and dx (= dh * mask / (1 - p)) separately (one more
N H write than without dropout); dlinear_bias sums dx. The reference applies the same mask (the
oracle); with ``seed=None`` it uses ``torch.nn.functional.dropout`` instead (the model's path where
no fused kernel serves). The C++ backend on CUDA has no dropout: such calls resolve to another backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch, _dropout
from . import _triton_utils as _tu
from ._triton_utils import tl, triton


def bias_residual_layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    linear_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain PyTorch, HF's exact order of operations: ``LN(dropout(x + linear_bias) + residual)``.

    ``upcast=True`` computes in fp32 and casts the result back to ``x.dtype`` (the oracle for
    half-precision comparisons). Dropout: see the module docstring.
    """
    dtype = x.dtype
    h = x.float() if upcast else x
    if linear_bias is not None:
        h = h + (linear_bias.float() if upcast else linear_bias)
    if dropout_p > 0:
        if seed is None:
            h = F.dropout(h, dropout_p)
        else:
            rows = h.numel() // max(1, h.shape[-1])
            mult = _dropout.rows_multiplier(seed, dropout_p, rows, h.shape[-1], h.device, h.dtype)
            h = h * mult.view(h.shape)
    if residual is not None:
        h = h + (residual.float() if upcast else residual)
    w, b = (weight.float(), bias.float()) if upcast else (weight, bias)
    return F.layer_norm(h, (h.shape[-1],), w, b, eps).to(dtype)


def _check(x, weight, bias, linear_bias, residual) -> None:
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("linear_bias", linear_bias)):
        if t is not None and t.shape != (hidden,):
            raise ValueError(f"bias_residual_layer_norm: {name} has shape {tuple(t.shape)}, expected ({hidden},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"bias_residual_layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("linear_bias", linear_bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"bias_residual_layer_norm: {name} is on {t.device}, x on {x.device}")


def _triton_support(x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None) -> str | None:
    """``None`` when the Triton kernel can serve this call, else the reason it cannot."""
    if dropout_p > 0 and seed is None:
        return "fused dropout needs a seed"
    return _tu.unsupported_rows(x.shape[-1], x, weight, bias, linear_bias, residual)


def _cpp_support(x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None) -> str | None:
    if dropout_p > 0:
        if x.device.type != "cpu":
            return "dropout is fused in the CPU kernel only"
        if seed is None:
            return "fused dropout needs a seed"
    return _dispatch.fused_dtypes(x, weight, bias, linear_bias, residual)


def _bias_residual_layer_norm_fake(x, weight, bias, eps, linear_bias=None, residual=None, dropout_p=0.0, seed=None):
    """Fake (meta) implementation of ``bert_fast::bias_residual_layer_norm`` and its Triton custom op."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bias_residual_layer_norm_cpp(x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None):
    if dropout_p > 0:
        op = torch.ops.bert_fast.bias_residual_layer_norm_dropout
        return op(x, weight, bias, eps, linear_bias, residual, dropout_p, seed)
    return torch.ops.bert_fast.bias_residual_layer_norm(x, weight, bias, eps, linear_bias, residual)


def bias_residual_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    linear_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(dropout(x + linear_bias) + residual)`` over the last dim, fused. ``x``: (..., H).

    ``dropout_p > 0`` draws ``seed`` from the default generator when none is given (the mask is a
    function of the seed, see the module docstring).
    """
    _check(x, weight, bias, linear_bias, residual)
    seed = _dropout.checked_seed("bias_residual_layer_norm", dropout_p, seed)
    return OP(backend, x, weight, bias, float(eps), linear_bias, residual, float(dropout_p), seed)


# --- Triton kernels ------------------------------------------------------------------------------


@_tu.jit(do_not_specialize=_tu.DROPOUT_ARGS)
def _bias_residual_layer_norm_fwd_kernel(
    X,  # pointer to the input rows (GEMM output without its bias), shape (N, H), unit column stride
    Residual,  # pointer to the residual rows, shape (N, H), unit column stride; read iff HAS_RESIDUAL
    LinearBias,  # pointer to the GEMM bias, shape (H,); read iff HAS_LINEAR_BIAS
    W,  # pointer to the LayerNorm weight, shape (H,)
    B,  # pointer to the LayerNorm bias, shape (H,)
    Y,  # pointer to the output, shape (N, H), unit column stride
    stride_x_row,
    stride_residual_row,
    stride_y_row,
    n_cols,
    eps,
    seed: tl.int64,  # dropout seed (read iff DROPOUT)
    dropout_threshold: tl.int64,  # floor(p 2^32): elements whose Philox word is below are dropped
    dropout_scale,  # 1 / (1 - p)
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride product: N * H may exceed 2^31
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    # Everything in fp32 from the first add on, in HF's order ((x + bias) + residual). Masked lanes
    # load 0 so they add nothing to the sums below.
    h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_LINEAR_BIAS:
        h += tl.load(LinearBias + cols, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:  # HF's dropout(x + bias) before the residual add; stream 0, index row * H + column
        keep = _tu.dropout_keep(seed, row * 0, row * n_cols + cols, dropout_threshold)
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(Residual + row * stride_residual_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = _tu.layer_norm_row(h, cols, mask, n_cols, W, B, eps)  # two-pass fp32 statistics, eps as given
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)  # one rounding


def _bias_residual_layer_norm_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    linear_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Triton forward: ``LayerNorm(dropout(x + linear_bias) + residual)``; ``x`` (..., H), returns x's
    dtype/shape. Dropout (``dropout_p > 0``) takes the mask of ``seed``.

    Arguments are asserted, not validated: :func:`bias_residual_layer_norm` validates them.
    """
    assert weight.shape == bias.shape == (x.shape[-1],) and (residual is None or residual.shape == x.shape)
    x2 = _tu.flatten_rows(x)
    residual2 = _tu.flatten_rows(residual) if residual is not None else None
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return y.view(x.shape)
    weight, bias = weight.contiguous(), bias.contiguous()
    linear_bias = linear_bias.contiguous() if linear_bias is not None else None
    args = (
        x2,
        residual2 if residual2 is not None else x2,  # dummy pointer, never read
        linear_bias if linear_bias is not None else weight,  # dummy pointer, never read
        weight,
        bias,
        y,
        x2.stride(0),
        residual2.stride(0) if residual2 is not None else 0,
        y.stride(0),
        n_cols,
        float(eps),
        *_tu.dropout_args(dropout_p, seed),
    )
    flags = {"HAS_LINEAR_BIAS": linear_bias is not None, "HAS_RESIDUAL": residual2 is not None,
             "DROPOUT": dropout_p > 0}  # fmt: skip
    _tu.launch_rows(_bias_residual_layer_norm_fwd_kernel, args, flags, n_rows, n_cols, x.device)
    return y.view(x.shape)


bias_residual_layer_norm_fwd = _tu.launcher(
    "bias_residual_layer_norm_fwd",
    "(Tensor x, Tensor weight, Tensor bias, float eps, Tensor? linear_bias, Tensor? residual, float dropout_p, "
    "int? seed) -> Tensor",
    _bias_residual_layer_norm_fwd_impl,
    _bias_residual_layer_norm_fake,
)


def _bias_residual_layer_norm_triton(x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None):
    return bias_residual_layer_norm_fwd(x, weight, bias, eps, linear_bias, residual, dropout_p, seed)


def aot_specs() -> list[dict]:
    """Every kernel specialization the launcher can choose, for the ahead-of-time compile test.

    Entries as :func:`~bert_fast.kernels._triton_utils.row_aot_specs` lists them (``{dt}`` standing
    for the activation dtype); the heaviest variant has both optional inputs (most live registers).
    """
    sig = {
        "X": "*{dt}", "Residual": "*{dt}", "LinearBias": "*{dt}", "W": "*{dt}", "B": "*{dt}",
        "Y": "*{dt}", "stride_x_row": "i32", "stride_residual_row": "i32", "stride_y_row": "i32",
        "n_cols": "i32", "eps": "fp32", "seed": "i64", "dropout_threshold": "i64", "dropout_scale": "fp32",
    }  # fmt: skip
    flags = {"HAS_LINEAR_BIAS": "lb", "HAS_RESIDUAL": "res", "DROPOUT": "drop"}
    kernel = _bias_residual_layer_norm_fwd_kernel
    variants = [(True, True, False), (True, False, False), (False, True, False), (False, False, False)]
    # dropout (training): the model's variant (both inputs) on every block, the lightest on BERT's
    return (_tu.row_aot_specs("layer_norm", kernel, sig, flags, variants)
            + _tu.row_aot_specs("layer_norm", kernel, sig, flags, [(True, True, True), (False, False, True)]))


# --- backward ----------------------------------------------------------------------------------


@_tu.jit(do_not_specialize=_tu.DROPOUT_ARGS)
def _bias_residual_layer_norm_bwd_kernel(
    G,  # pointer to the gradient of the output, shape (N, H), unit column stride
    X,  # pointer to the forward input rows, shape (N, H), unit column stride
    Residual,  # pointer to the residual rows, shape (N, H); read iff HAS_RESIDUAL
    LinearBias,  # pointer to the GEMM bias, shape (H,); read iff HAS_LINEAR_BIAS
    W,  # pointer to the LayerNorm weight, shape (H,)
    DX,  # pointer to the gradient of x (= of the summed input h without dropout), shape (N, H)
    DRes,  # pointer to the gradient of the residual (= of h), shape (N, H); written iff DROPOUT (else DX is it)
    Partial,  # pointer to per-program partial column sums, fp32, shape (programs, 3, H): dw, db, dlb
    stride_g_row,
    stride_x_row,
    stride_residual_row,
    stride_dx_row,
    n_rows,
    n_cols,
    rows_per_program,
    eps,
    seed: tl.int64,  # the forward's dropout seed (read iff DROPOUT)
    dropout_threshold: tl.int64,
    dropout_scale,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid, cols, mask, w = _tu.row_program(W, n_cols, BLOCK_H)
    if HAS_LINEAR_BIAS:
        lb = tl.load(LinearBias + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    dlb = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid * rows_per_program + i
        # Rows past the end load zeros everywhere: h = 0, dy = 0, so they add exactly 0 below.
        rmask = cols < tl.where(row < n_rows, n_cols, 0)
        h = tl.load(X + row * stride_x_row + cols, mask=rmask, other=0.0).to(tl.float32)
        if HAS_LINEAR_BIAS:
            h += tl.where(rmask, lb, 0.0)
        if DROPOUT:  # the forward's mask, regenerated (h = (x + lb) * mult + residual)
            mult = tl.where(_tu.dropout_keep(seed, row * 0, row * n_cols + cols, dropout_threshold), dropout_scale, 0.0)
            h *= mult
        if HAS_RESIDUAL:
            h += tl.load(Residual + row * stride_residual_row + cols, mask=rmask, other=0.0).to(tl.float32)
        # statistics recomputed as the forward computes them (two-pass, fp32, biased variance)
        mean = tl.sum(h, axis=0) / n_cols
        diff = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / n_cols + eps)
        dy = tl.load(G + row * stride_g_row + cols, mask=rmask, other=0.0).to(tl.float32)
        xhat, dh = _tu.layer_norm_row_bwd(dy, w, diff, rstd, rmask, n_cols)
        if DROPOUT:  # d residual = dh; dx = dh * mult (0 where dropped)
            if HAS_RESIDUAL:
                tl.store(DRes + row * stride_dx_row + cols, dh.to(DRes.dtype.element_ty), mask=rmask)
            dh *= mult
        tl.store(DX + row * stride_dx_row + cols, dh.to(DX.dtype.element_ty), mask=rmask)
        dw += dy * xhat
        db += dy
        dlb += dh
    base = Partial + pid * 3 * n_cols
    tl.store(base + cols, dw, mask=mask)
    tl.store(base + n_cols + cols, db, mask=mask)
    tl.store(base + 2 * n_cols + cols, dlb, mask=mask)


def _bias_residual_layer_norm_bwd_triton(grad, x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None):
    """Triton backward: ``(dx, dweight, dbias, dlinear_bias, dresidual)`` (parameter grads fp32).

    Without dropout dx and dresidual are one tensor; with it, dx = dresidual * mask multiplier.
    """
    x2, g2 = _tu.flatten_rows(x), _tu.flatten_rows(grad)
    r2 = _tu.flatten_rows(residual) if residual is not None else None
    n_rows, n_cols = x2.shape
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dres = torch.empty_like(dx) if dropout_p > 0 and residual is not None else dx
    # Programs: a fixed count (small under the interpreter), each looping over a run of rows and
    # keeping its column sums in registers; the (programs, 3, H) partials are reduced by one sum.
    programs = max(1, min(n_rows, 8 if _tu.interpreting() else 1024))
    rows_per_program = triton.cdiv(max(n_rows, 1), programs)
    partial = torch.zeros((programs, 3, n_cols), dtype=torch.float32, device=x.device)
    if n_rows:
        block = _tu.row_block(n_cols)
        wc = weight.contiguous()
        lbc = linear_bias.contiguous() if linear_bias is not None else None
        args = (g2, x2, r2 if r2 is not None else x2, lbc if lbc is not None else wc, wc, dx, dres, partial,
                g2.stride(0), x2.stride(0), r2.stride(0) if r2 is not None else 0, dx.stride(0),
                n_rows, n_cols, rows_per_program, float(eps), *_tu.dropout_args(dropout_p, seed))  # fmt: skip
        with _tu.device_guard(x.device):
            _bias_residual_layer_norm_bwd_kernel[(programs,)](
                *args, HAS_LINEAR_BIAS=linear_bias is not None, HAS_RESIDUAL=residual is not None,
                DROPOUT=dropout_p > 0, BLOCK_H=block,
                num_warps=_tu.INTERPRET_ROW_WARPS if _tu.interpreting() else (4 if block <= 1024 else 8),
            )  # fmt: skip
    sums = partial.sum(0)
    dx, dres = dx.view(x.shape), dres.view(x.shape)
    dlb = sums[2] if linear_bias is not None else None
    return dx, sums[0], sums[1], dlb, (dres if residual is not None else None)


def _bias_residual_layer_norm_bwd_cpp(grad, x, weight, bias, eps, linear_bias, residual, dropout_p=0.0, seed=None):
    op = torch.ops.bert_fast.bias_residual_layer_norm_bwd
    dx, dw, db, dlb, dres = op(grad, x, weight, bias, eps, linear_bias, residual, dropout_p, seed or 0)
    if dropout_p == 0:
        dres = dx  # the same gradient; the op returned an empty placeholder
    return dx, dw, db, (dlb if linear_bias is not None else None), (dres if residual is not None else None)


_bias_residual_layer_norm_bwd_cpp.available = lambda: hasattr(  # type: ignore[attr-defined]
    torch.ops.bert_fast, "bias_residual_layer_norm_bwd"
)


def _bias_residual_layer_norm_bwd_fake(
    grad, x, weight, bias, eps, linear_bias=None, residual=None, dropout_p=0.0, seed=0
):
    """Fake (meta) implementation of ``bert_fast::bias_residual_layer_norm_bwd``."""
    h = x.shape[-1]
    vec = [x.new_empty((h,), dtype=torch.float32) for _ in range(3)]
    dres = torch.empty_like(x, memory_format=torch.contiguous_format) if dropout_p > 0 else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *vec, dres)


def _bias_residual_layer_norm_dropout_fake(x, weight, bias, eps, linear_bias, residual, dropout_p, seed):
    """Fake (meta) implementation of ``bert_fast::bias_residual_layer_norm_dropout``."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def bias_residual_layer_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    linear_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    backend: str,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> tuple:
    """Gradients of :func:`bias_residual_layer_norm` by the ``backend``'s kernel (``"triton"``, ``"cpp"`` on CPU).

    Returns ``(dx, dweight, dbias, dlinear_bias, dresidual)``; ``dx`` (x's dtype) is the gradient
    of the summed row, and so also ``dresidual`` (the same tensor; ``None`` without a residual);
    the parameter gradients are fp32 column sums (``dlinear_bias`` ``None`` without a linear bias).
    One pass per row recomputes mean and rstd in fp32 from x (+ bias) (+ residual); bytes: reads
    grad, x, residual, writes dx (4 N H elements); FLOPs ~ 12 N H.
    """
    impl = OP.backward[backend]
    if isinstance(impl, dict):
        impl = impl[x.device.type]
    return impl(grad.contiguous(), x, weight, bias, float(eps), linear_bias, residual, float(dropout_p), seed)


_dispatch.register_cpp_fake("bias_residual_layer_norm", _bias_residual_layer_norm_fake)
_dispatch.register_cpp_fake("bias_residual_layer_norm_bwd", _bias_residual_layer_norm_bwd_fake)
_dispatch.register_cpp_fake("bias_residual_layer_norm_dropout", _bias_residual_layer_norm_dropout_fake)

OP = _dispatch.Op(
    "bias_residual_layer_norm",
    bias_residual_layer_norm_ref,
    {"triton": _bias_residual_layer_norm_triton, "cpp": _bias_residual_layer_norm_cpp},
    supports={"triton": _triton_support, "cpp": _cpp_support},
    grad_args=(0, 1, 2, 4, 5),
    backward={"triton": _bias_residual_layer_norm_bwd_triton, "cpp": {"cpu": _bias_residual_layer_norm_bwd_cpp}},
)
