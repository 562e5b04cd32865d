"""Fused bias + activation: ``y = act(x + bias)`` for BERT's intermediate (FFN up) projection.

The GEMM runs without its bias; the bias add and the activation are one elementwise pass:
2 N I elements moved (read x, write y) instead of 4 for the unfused pair (I = intermediate size,
4 H in BERT; the largest activation of the layer). Memory-bound.

Activations (HF ``hidden_act`` -> our name):

* ``gelu`` -> ``"gelu"``: exact, ``0.5 x (1 + erf(x / sqrt 2))``.
* ``gelu_new``, ``gelu_pytorch_tanh`` -> ``"gelu_tanh"``:
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
* ``relu`` -> ``"relu"``.

Numerics: computed in fp32 inside the fused kernels, rounded once to the output dtype.

Triton kernel (:func:`bias_act_fwd`): 2-D tiles of (BLOCK_M rows x BLOCK_N columns) of the
(rows, I) view, so the bias tile is loaded once per program and no modulo is needed; tile shape
and warps autotuned on the GPU (:func:`_bias_act_configs`), keyed on I. ``erf`` is
``tl.math.erf``; tanh is written as ``2 sigmoid(2 u) - 1`` (exact identity; no libdevice call, so
the same code runs under the Triton interpreter). Limits: fp16/bf16/fp32, unit stride along I
(other layouts are copied first), any number of leading dims.

Backends: ``torch`` (:func:`bias_act_ref`), ``triton``, ``cpp``. Backward (under autograd): a fused
kernel per backend, ``_bias_act_bwd_kernel`` (Triton) and ``bert_fast::bias_act_bwd`` (C++, CPU):
one pass recomputing ``x + bias`` in fp32, ``dx = grad * act'(x + bias)`` rounded once, and ``dbias``
as per-row-block fp32 partial column sums reduced afterwards (deterministic). The C++ backend on
CUDA has no backward kernel and uses the reference backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch
from . import _triton_utils as _tu
from ._triton_utils import tl, triton

#: Our activation names; a name's index is its code in the Triton kernel (``ACTIVATION`` constexpr).
#: The C++ extension takes the names.
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}

#: HF ``config.hidden_act`` values we support, mapped to our activation names.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, activation: str, upcast: bool = False) -> torch.Tensor:
    """Plain PyTorch: ``act(x + bias)``; ``upcast=True`` computes in fp32 and casts back."""
    dtype = x.dtype
    h = x.float() if upcast else x
    if bias is not None:
        h = h + (bias.float() if upcast else bias)
    if activation == "gelu":
        y = F.gelu(h)
    elif activation == "gelu_tanh":
        y = F.gelu(h, approximate="tanh")
    elif activation == "relu":
        y = F.relu(h)
    else:
        raise ValueError(f"bias_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return y.to(dtype)


def _triton_support(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> str | None:
    """``None`` when the Triton kernel can serve this call, else the reason it cannot."""
    return _tu.unsupported_common(x, bias)


def _bias_act_fake(x, bias, activation):
    """Fake (meta) implementation of ``bert_fast::bias_act`` and ``bert_fast_triton::bias_act_fwd``."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bias_act_cpp(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return torch.ops.bert_fast.bias_act(x, bias, activation)


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, activation: str, *, backend: str | None = None
) -> torch.Tensor:
    """``act(x + bias)`` fused; ``x``: (..., I), ``bias``: (I,) or ``None``."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"bias_act: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_act: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},)")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias_act: bias is on {bias.device}, x on {x.device}")
    return OP(backend, x, bias, activation)


# --- Triton kernels ------------------------------------------------------------------------------


@_tu.jit
def _bias_act_load(
    X,  # pointer to the input (GEMM output without its bias), shape (M, I), unit column stride
    Bias,  # pointer to the bias, shape (I,); read iff HAS_BIAS
    stride_x_row,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """This program's (BLOCK_M, BLOCK_N) tile: ``(pid_m, rows, cols, col_mask, mask, h)``, ``h = x + bias``
    in fp32 (masked lanes read 0: finite)."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64 before the stride product: M * I may exceed 2^31
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_mask[None, :]
    # fp32 from the load on; one rounding at the store.
    h = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return pid_m, rows, cols, col_mask, mask, h


@_tu.jit
def _tanh_gelu_t(h):
    """``tanh(u)``, ``u = sqrt(2/pi) (h + 0.044715 h^3)``: the tanh of the tanh GELU.

    tanh(u) = 2 sigmoid(2u) - 1 exactly (the rounding error near u = 0 is absolute, ~1 ulp of 1).
    u is clamped to [-20, 20], where tanh is already +-1 in fp32, only so that exp(-2u) inside
    sigmoid never overflows to inf: the result is unchanged.
    """
    u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) (h + 0.044715 h^3)
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@_tu.jit
def _bias_act_fwd_kernel(
    X,  # pointer to the input (GEMM output without its bias), shape (M, I), unit column stride
    Bias,  # pointer to the bias, shape (I,); read iff HAS_BIAS
    Y,  # pointer to the output, shape (M, I), unit column stride
    stride_x_row,
    stride_y_row,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 gelu (erf), 1 gelu_tanh, 2 relu
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    _, rows, cols, _, mask, h = _bias_act_load(X, Bias, stride_x_row, n_rows, n_cols, HAS_BIAS, BLOCK_M, BLOCK_N)
    if ACTIVATION == 0:
        # Exact GELU, 0.5 h (1 + erf(h / sqrt 2)), as F.gelu(approximate="none").
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACTIVATION == 1:
        y = 0.5 * h * (1.0 + _tanh_gelu_t(h))  # the error of tanh (~1 ulp of 1) times 0.5 h
    else:
        # relu written so that NaN propagates like torch.relu (NaN < 0 is false: NaN kept).
        y = tl.where(h < 0.0, 0.0, h)
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _bias_act_configs() -> list:
    """Autotune configs (BLOCK_M, BLOCK_N, warps): 32 elements per thread; BLOCK_N divides BERT's
    intermediate sizes (1536, 3072, 4096), so column tiles are rarely partly masked."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1)
        for bm, bn, w in ((4, 1024, 4), (8, 1024, 8), (16, 256, 4), (32, 256, 8))
    ]


#: Fixed tile under the interpreter: small enough that the tests' sizes exercise both masks.
_INTERPRET_BIAS_ACT = {"BLOCK_M": 16, "BLOCK_N": 128}
_INTERPRET_WARPS = 4  # ignored by the interpreter


def _bias_act_fwd_impl(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Triton forward: ``act(x + bias)`` in fp32, rounded once; ``x`` (..., I), returns x's dtype/shape.

    Arguments are asserted, not validated: :func:`bias_act` validates them.
    """
    assert activation in ACTIVATION_CODES and (bias is None or bias.shape == (x.shape[-1],))
    x2 = _tu.flatten_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.view(x.shape)
    bias_c = bias.contiguous() if bias is not None else None
    args = (x2, bias_c if bias_c is not None else x2, y, x2.stride(0), y.stride(0), n_rows, n_cols)
    flags = {"HAS_BIAS": bias is not None, "ACTIVATION": ACTIVATION_CODES[activation]}
    interpret = dict(_INTERPRET_BIAS_ACT, num_warps=_INTERPRET_WARPS)
    kernel, cfg = _tu.tuned(_bias_act_fwd_kernel, ("n_cols",), _bias_act_configs, rows=n_rows, interpret=interpret)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))

    with _tu.device_guard(x.device):
        kernel[grid](*args, **flags, **cfg)
    return y.view(x.shape)


bias_act_fwd = _tu.launcher(
    "bias_act_fwd", "(Tensor x, Tensor? bias, str activation) -> Tensor", _bias_act_fwd_impl, _bias_act_fake
)


def aot_specs() -> list[dict]:
    """Every kernel specialization the launcher can choose, for the ahead-of-time compile test.

    Each entry (:func:`~bert_fast.kernels._triton_utils.aot_spec`): ``label``, ``kernel``,
    ``signature`` (argument -> Triton type, ``{dt}`` standing for the activation dtype),
    ``constexprs``, ``num_warps``, ``num_stages``.
    """
    sig = {
        "X": "*{dt}", "Bias": "*{dt}", "Y": "*{dt}", "stride_x_row": "i32", "stride_y_row": "i32",
        "n_rows": "i32", "n_cols": "i32",
    }  # fmt: skip
    specs = []
    # Every config with the heaviest variant (exact GELU with a bias); every activation and the
    # bias-free variant on the first config (the tile code is shared, only the epilogue differs).
    for i, cfg in enumerate(_bias_act_configs()):
        tile = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w={cfg.num_warps}"
        for act, code in ACTIVATION_CODES.items():
            for has_bias in (True, False):
                if i > 0 and (act != "gelu" or not has_bias):
                    continue
                consts = {"HAS_BIAS": has_bias, "ACTIVATION": code, **cfg.kwargs}
                label = f"bias_act {act} bias={has_bias} {tile}"
                specs.append(_tu.aot_spec(label, _bias_act_fwd_kernel, sig, consts, cfg))
    return specs


# --- backward ----------------------------------------------------------------------------------


@_tu.jit
def _bias_act_bwd_kernel(
    G,  # pointer to the gradient of the output, shape (M, I), unit column stride
    X,  # pointer to the forward input (GEMM output without its bias), shape (M, I), unit column stride
    Bias,  # pointer to the bias, shape (I,); read iff HAS_BIAS
    DX,  # pointer to the gradient of x, shape (M, I), unit column stride
    DBiasPartial,  # pointer to per-row-block partial sums of dx, shape (cdiv(M, BLOCK_M), I), fp32; iff HAS_BIAS
    stride_g_row,
    stride_x_row,
    stride_dx_row,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 gelu (erf), 1 gelu_tanh, 2 relu
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # h = x + bias recomputed in fp32 (the forward saves only x); masked lanes read 0 (finite).
    pid_m, rows, cols, col_mask, mask, h = _bias_act_load(
        X, Bias, stride_x_row, n_rows, n_cols, HAS_BIAS, BLOCK_M, BLOCK_N
    )
    g = tl.load(G + rows[:, None] * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        # d/dh [h Phi(h)] = Phi(h) + h phi(h)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
        d = cdf + h * pdf
    elif ACTIVATION == 1:
        # 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2), t = tanh(u)
        t = _tanh_gelu_t(h)
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    else:
        d = tl.where(h > 0.0, 1.0, 0.0)  # 0 at h == 0, as torch's threshold_backward
    dx = (g * d).to(DX.dtype.element_ty)
    tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx, mask=mask)
    if HAS_BIAS:
        # dbias sums the stored (rounded) dx, so dbias == dx.sum(0) exactly up to fp32 summation order.
        part = tl.sum(tl.where(mask, dx.to(tl.float32), 0.0), axis=0)
        tl.store(DBiasPartial + pid_m * n_cols + cols, part, mask=col_mask)


def _bias_act_bwd_triton(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str):
    """Triton backward: ``(dx, dbias)``; dx in x's dtype, dbias fp32 (column sum of per-block partials)."""
    x2, g2 = _tu.flatten_rows(x), _tu.flatten_rows(grad)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    cfg = _INTERPRET_BIAS_ACT if _tu.interpreting() else {"BLOCK_M": 16, "BLOCK_N": 256}
    n_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    partial = None
    if bias is not None:
        partial = torch.zeros((max(n_blocks, 1), n_cols), dtype=torch.float32, device=x.device)
    if dx.numel():
        bias_c = bias.contiguous() if bias is not None else None
        args = (g2, x2, bias_c if bias_c is not None else x2, dx, partial if partial is not None else dx,
                g2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols)  # fmt: skip
        grid = (n_blocks, triton.cdiv(n_cols, cfg["BLOCK_N"]))
        with _tu.device_guard(x.device):
            _bias_act_bwd_kernel[grid](
                *args, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation], **cfg, num_warps=4
            )
    return dx.view(x.shape), (partial.sum(0) if partial is not None else None)


def _bias_act_bwd_cpp(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str):
    dx, dbias = torch.ops.bert_fast.bias_act_bwd(grad, x, bias, activation)
    return dx, (dbias if bias is not None else None)


_bias_act_bwd_cpp.available = lambda: hasattr(torch.ops.bert_fast, "bias_act_bwd")  # type: ignore[attr-defined]


def _bias_act_bwd_fake(grad, x, bias, activation):
    """Fake (meta) implementation of ``bert_fast::bias_act_bwd``."""
    n = x.shape[-1] if bias is not None else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((n,), dtype=torch.float32)


def bias_act_backward(
    grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str, *, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dbias)`` of :func:`bias_act` by the ``backend``'s kernel (``"triton"`` or ``"cpp"`` on CPU).

    dx = grad * act'(x + bias) computed in fp32 and rounded once to x's dtype; dbias (fp32) is the
    column sum of dx (``None`` without a bias). Bytes: reads grad and x, writes dx (3 M I elements);
    FLOPs ~ 10-25 per element (exact GELU's erf and exp dominate).
    """
    impl = OP.backward[backend]
    if isinstance(impl, dict):
        impl = impl[x.device.type]
    return impl(grad.contiguous(), x, bias, activation)


_dispatch.register_cpp_fake("bias_act", _bias_act_fake)
_dispatch.register_cpp_fake("bias_act_bwd", _bias_act_bwd_fake)

OP = _dispatch.Op(
    "bias_act",
    bias_act_ref,
    {"triton": bias_act_fwd, "cpp": _bias_act_cpp},
    supports={"triton": _triton_support, "cpp": _dispatch.fused_dtypes},
    grad_args=(0, 1),
    backward={"triton": _bias_act_bwd_triton, "cpp": {"cpu": _bias_act_bwd_cpp}},
)
