"""Shared plumbing for the Triton backends of the fused ops.

* ``triton`` stays optional: when it cannot be imported, :data:`TRITON_IMPORT_ERROR` says why,
  :func:`jit` returns the plain Python function (never launched: every op's ``_triton_support``
  then returns a reason and the dispatcher falls back), and ``tl`` is ``None``. Kernels use
  ``from __future__ import annotations``, so their ``tl.constexpr`` annotations are never evaluated
  at definition time.
* Nothing here touches the GPU or Triton's driver at import time: autotuned kernels are built on
  first use (:func:`autotuned`), and the configs are plain :class:`triton.Config` objects.
* Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) autotuning cannot launch
  kernels to time them, so every launcher uses one fixed, small config there.
* torch.compile: every launcher is also registered as a ``torch.library.custom_op`` in the
  ``bert_fast_triton`` namespace with a fake (meta) implementation (:func:`launcher`). Launchers
  route through the custom op only while Dynamo traces (``torch.compiler.is_compiling()``), so
  eager calls pay no dispatcher overhead and compiled graphs hold one opaque node per fused op (no
  graph break).
  The namespace is distinct from the C++ extension's ``bert_fast`` library on purpose; both use
  the same fake implementation per op.
* Launchers only assert their preconditions: the public functional validated the call (and the
  model validates its inputs once per forward).
* Every launch runs under :func:`device_guard` of its tensors' device: a model on ``cuda:1`` while
  device 0 is current must launch on device 1.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

import torch

from . import _backend, _dropout

try:  # triton is an optional dependency
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

#: torch.library namespace of the custom ops wrapping our launchers.
OP_NAMESPACE = "bert_fast_triton"

#: dtypes every Triton kernel accepts for activations.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest hidden size of the row kernels (LayerNorm, embeddings): one row lives in registers.
MAX_HIDDEN = 4096

#: The row blocks (next power of two >= hidden, at least 16) the row kernels are built for:
#: hidden 1..4096. Used by the ahead-of-time compile specs.
ROW_BLOCKS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def jit(fn: Callable | None = None, **options: object) -> Callable:
    """``triton.jit`` when triton is importable; otherwise the function itself (never launched).

    ``@jit(do_not_specialize=(...))`` passes options through (seeds: one compiled kernel for every value).
    """
    if fn is None:
        return lambda f: jit(f, **options)
    return triton.jit(fn, **options) if triton is not None else fn


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


#: Whether the kernels of this process run under the Triton interpreter. ``triton.jit`` decides
#: that when a kernel is decorated (module import), so it is read once here, not per launch.
INTERPRETING = _backend.interpreter_enabled()


def interpreting() -> bool:
    return INTERPRETING


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a launch (a no-op when it already is, or on CPU).

    Triton launches on the *current* device, whatever device the tensors live on.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def unsupported_common(*tensors: torch.Tensor | None) -> str | None:
    """Reasons shared by all ops: triton importable, a supported dtype for every float tensor."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported (fp16, bf16, fp32)"
    return None


def unsupported_rows(hidden: int, *tensors: torch.Tensor | None) -> str | None:
    """Reasons of the row kernels (one row of ``hidden`` values in registers): the common ones, and
    ``hidden`` above :data:`MAX_HIDDEN`."""
    reason = unsupported_common(*tensors)
    if reason is None and hidden > MAX_HIDDEN:
        reason = f"hidden size {hidden} > {MAX_HIDDEN} (one row must fit in registers)"
    return reason


def row_warps(block: int) -> list[int]:
    """Warp counts for a kernel holding one ``block``-wide row in registers.

    4 to 16 elements per thread: at least one 16-byte vector per thread for 32-bit data, and at
    most 16 fp32 values per thread per live row tile (the row kernels keep about three such tiles
    live), well below the register limit; ``tests/test_triton_aot.py`` checks for spills. Rows
    too short for 4 elements per thread get one warp.
    """
    warps = [w for w in (1, 2, 4, 8, 16) if 4 * 32 * w <= block <= 16 * 32 * w]
    return warps or [1]


def row_configs(block: int) -> list:
    """Autotune configs of the row kernels (LayerNorm, embeddings + LayerNorm) for a row block."""
    return [triton.Config({}, num_warps=w, num_stages=1) for w in row_warps(block)]


#: Config used for the row kernels under the interpreter (the warp count is ignored there).
INTERPRET_ROW_WARPS = 4


def row_block(n_cols: int) -> int:
    """``BLOCK_H`` of a row kernel: the next power of two >= ``n_cols``, at least 16."""
    return max(next_power_of_2(n_cols), 16)


#: Smallest row-count bucket of the autotune keys.
MIN_ROWS_BUCKET = 64


def rows_bucket(rows: int) -> int:
    """The autotune bucket of a launch's row (token) count: the next power of two, at least 64."""
    return max(MIN_ROWS_BUCKET, next_power_of_2(rows))


def autotuned(
    kernel: Callable, key: tuple[str, ...], configs_fn: Callable, *bucket: object, rows: int | None = None
) -> Callable:
    """``triton.autotune(configs_fn(*bucket), key)(kernel)``, built on first use and cached per bucket.

    ``bucket`` holds the launcher's compile-time choices the configs depend on (row block, head
    dim); ``key`` names the runtime arguments whose values select a tuned config (Triton also adds
    the dtypes of all tensor arguments to the key). ``rows``: the launch's row (token) count; each
    log2 bucket of it (:func:`rows_bucket`) gets its own autotuner, i.e. the row bucket is part of
    the tuning key, so a config tuned on a batch-1 warm-up is not reused for a 4096-token batch
    (and a CUDA-graph warm-up at a bucket's exact size tunes what its capture will launch).
    """
    return _autotuner(kernel, tuple(key), configs_fn, bucket, None if rows is None else rows_bucket(rows))


@functools.cache
def _autotuner(kernel: Callable, key: tuple[str, ...], configs_fn: Callable, bucket: tuple, rows: int | None):
    return triton.autotune(configs=configs_fn(*bucket), key=list(key))(kernel)


def tuned(
    kernel: Callable, key: tuple[str, ...], configs_fn: Callable, *bucket: object, rows: int, interpret: dict
) -> tuple[Callable, dict]:
    """What a launcher launches: ``(kernel to index with the grid, meta-parameters to pass)``.

    Under the interpreter (autotuning cannot launch there): ``kernel`` itself with the fixed config
    ``interpret`` (meta-parameters and ``num_warps``). On the GPU: the autotuner of
    :func:`autotuned` (``key``, ``configs_fn``, ``bucket``, ``rows`` as there), which picks them.
    """
    if INTERPRETING:
        return kernel, interpret
    return autotuned(kernel, key, configs_fn, *bucket, rows=rows), {}


def launch_rows(kernel: Callable, args: tuple, flags: dict, n_rows: int, n_cols: int, device: torch.device) -> None:
    """Launch a row kernel: one program per row, the whole row in registers (``BLOCK_H`` =
    :func:`row_block`), the warp count autotuned per row block and ``n_cols`` on the GPU
    (:func:`row_configs`), :data:`INTERPRET_ROW_WARPS` under the interpreter."""
    block = row_block(n_cols)
    interpret = {"num_warps": INTERPRET_ROW_WARPS}
    kernel, cfg = tuned(kernel, ("n_cols",), row_configs, block, rows=n_rows, interpret=interpret)
    with device_guard(device):
        kernel[(n_rows,)](*args, **flags, BLOCK_H=block, **cfg)


@jit
def layer_norm_row(h, cols, mask, n_cols, W, B, eps):
    """LayerNorm of one fp32 row ``h`` (``mask``: its ``n_cols`` valid lanes of ``cols``, which hold
    0 in ``h`` past them) with the weight ``W`` and bias ``B`` (pointers, shape (H,)); returns the
    fp32 result (one rounding left: the caller's store)."""
    # Shifted two-pass statistics from registers (no E[x^2] - E[x]^2 cancellation). Subtracting the
    # row's first element before summing makes the mean, and so the variance, exact for a constant
    # row: with eps = 1e-12, rstd is ~1e6 there and any rounding left in (h - mean) would be
    # amplified to O(0.1) (PyTorch's Welford LayerNorm gives exactly 0 too). Masked lanes are zeroed
    # each time.
    shift = tl.sum(tl.where(cols == 0, h, 0.0), axis=0)
    hs = tl.where(mask, h - shift, 0.0)
    mean_s = tl.sum(hs, axis=0) / n_cols
    diff = tl.where(mask, hs - mean_s, 0.0)  # = h - mean
    var = tl.sum(diff * diff, axis=0) / n_cols  # biased, as nn.LayerNorm
    # eps exactly as given (BERT's 1e-12 is a normal fp32 number; never clamped). rsqrt as in
    # PyTorch's own CUDA LayerNorm kernel.
    rstd = tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return diff * rstd * w + b


@jit
def row_program(W, n_cols, BLOCK_H: tl.constexpr):
    """The start of a LayerNorm-backward row program: ``(pid, cols, mask, w)``, its program id (int64
    before any stride product), the column offsets, their mask and the weight ``W`` as fp32 (0 on
    masked lanes)."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    return tl.program_id(0).to(tl.int64), cols, mask, tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)


@jit
def layer_norm_row_bwd(dy, w, diff, rstd, mask, n_cols):
    """Backward of one LayerNorm row (the twin of :func:`layer_norm_row`): from the output gradient
    ``dy`` and the weight ``w`` (fp32 rows), the row's deviations ``diff = h - mean`` (0 on masked
    lanes) and ``rstd``, returns ``(xhat, dh)``: the normalized row (for the caller's column sums
    dweight += dy xhat, dbias += dy) and the gradient of the summed row h, 0 outside ``mask``."""
    xhat = diff * rstd
    g = dy * w
    mg = tl.sum(g, axis=0) / n_cols
    mgx = tl.sum(g * xhat, axis=0) / n_cols
    return xhat, tl.where(mask, rstd * (g - mg - xhat * mgx), 0.0)


@jit
def varlen_program(CuSeqlens, num_heads):
    """The packed sequence and head of this program of a varlen attention grid (axis 1: batch * heads):
    ``(start, seqlen, head)``. ``start`` is int64 before any stride product (N * 3 * hidden may exceed
    2^31); offsets within a sequence stay int32 (the launchers check max_seqlen * stride < 2^31)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    seq = pid_bh // num_heads
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens + seq + 1).to(tl.int64) - start).to(tl.int32)
    return start, seqlen, pid_bh % num_heads


@jit
def varlen_offsets(pid, seqlen, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_LOOP: tl.constexpr):  # fmt: skip
    """Offsets of block ``pid`` of BLOCK tokens (the program's own), of a BLOCK_LOOP block starting
    at 0 (the one the kernel loops over) and of head_dim, with the head_dim mask and the mask of the
    program's tokens inside the sequence: ``(offs, offs_loop, offs_d, mask_d, mask)``."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    return offs, tl.arange(0, BLOCK_LOOP), offs_d, offs_d < HEAD_DIM, offs < seqlen


@jit
def online_softmax_init(BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """The online softmax's start for BLOCK_M query rows: ``(m_i, l_i, acc)`` = (-inf, 0, 0), fp32.

    The running max starts at -inf (not finfo.min): the first key block always holds a valid key
    (the loops only visit blocks that start inside the sequence), so the max is finite after the
    first step, alpha = exp2(-inf - finite) = 0 exactly, and no inf - inf ever occurs."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    return m_i, tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)


@jit
def online_softmax_step(s, mask_n, m_i, l_i):
    """One key block of the attention forward's online softmax (base 2): keys outside ``mask_n`` get
    -inf, i.e. probability exactly 0. Returns ``(p, alpha, m_new, l_new)``: the block's unnormalized
    probabilities, the factor rescaling what was accumulated, and the running max and row sum."""
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


#: The dropout arguments of the kernels, never specialized on their values (a fresh seed per call
#: must not compile a new variant when it happens to be divisible by 16; neither may a launch's
#: stream offset). Kernels name those they have.
DROPOUT_ARGS = ("seed", "dropout_threshold", "stream_offset")


def dropout_args(dropout_p: float, seed: int | None) -> tuple[int, int, float]:
    """The kernels' ``(seed, dropout_threshold, dropout_scale)`` arguments (placeholders without dropout)."""
    if dropout_p <= 0:
        return 0, 0, 1.0
    assert seed is not None, "fused dropout needs a seed"
    return int(seed), _dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p)


@jit
def dropout_keep(seed, stream, index, threshold):
    """Keep-mask of the elements ``index`` (int32 or int64 tensor) of dropout ``stream`` (int64 scalar):
    kept iff the element's Philox word (:func:`dropout_word`) >= ``threshold`` = floor(p 2^32)."""
    return dropout_word(seed, stream, index) >= threshold.to(tl.uint32)


@jit
def dropout_word(seed, stream, index):
    """The uint32 word deciding each element ``index`` of dropout ``stream``, the convention of
    :mod:`~bert_fast.kernels._dropout`: Philox4x32-10 keyed by the 64-bit ``seed``, counter
    (index >> 2 as two words, stream as two words), word ``index & 3``. ``tl.philox`` is
    Philox4x32-10 with Random123's constants and round order (checked against the oracle in
    tests/ops/test_dropout.py). Each element runs the 10 rounds of its counter (4 elements share
    one): a tile's elements need not be 4-aligned (attention's i * L + j is not)."""
    block = index >> 2
    c0 = block.to(tl.uint32)  # the low word (truncation)
    if tl.constexpr(index.dtype.primitive_bitwidth) > 32:
        c1 = (block >> 32).to(tl.uint32)
    else:
        c1 = c0 * 0  # index < 2^31
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, (stream & 0xFFFFFFFF).to(tl.uint32), (stream >> 32).to(tl.uint32))
    w = index & 3
    return tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))


@jit
def load_tile(base, rows, stride_tok, offs_d, mask_rows, mask_d):
    """The (rows, D_PAD) tile of one head at ``base`` (token stride ``stride_tok``, unit stride along
    head_dim). Padded head_dim lanes and rows past the sequence load 0: they add 0 to every dot
    product (and never 0 * NaN)."""
    return tl.load(base + rows[:, None] * stride_tok + offs_d[None, :], mask=mask_rows[:, None] & mask_d[None, :],
                   other=0.0)  # fmt: skip


def register_op(name: str, schema: str, impl: Callable, fake: Callable) -> Callable | None:
    """Register ``impl`` as ``bert_fast_triton::<name>`` with a fake implementation.

    Returns the op (``torch.ops.bert_fast_triton.<name>``) or ``None`` when registration is not
    possible in this torch (then torch.compile graph-breaks around the launcher instead).
    """
    try:
        op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
    except Exception:  # pragma: no cover - very old or unusual torch builds
        return None
    return op


def compiling() -> bool:
    """True while Dynamo traces (launchers then call their custom op)."""
    return torch.compiler.is_compiling()


def launcher(name: str, schema: str, impl: Callable, fake: Callable) -> Callable:
    """The launcher ``name`` that runs ``impl``: ``impl`` is registered as the custom op
    ``bert_fast_triton::<name>`` with ``fake`` (:func:`register_op`) and called through it while
    Dynamo traces (one opaque node in the graph), directly otherwise (no dispatcher overhead). It
    keeps ``impl``'s docstring; without a registrable custom op it is ``impl``'s call alone."""
    op = register_op(name, schema, impl, fake)
    # The op's schema has no defaults: under tracing every argument goes by position. Built here
    # from plain names and values (``Signature.bind`` is not traceable by Dynamo).
    params = list(inspect.signature(impl).parameters.values())
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    @functools.wraps(impl)
    def launch(*args, **kwargs):
        if op is not None and compiling():
            rest = [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args) :]]
            return op(*args, *rest)
        return impl(*args, **kwargs)

    launch.__name__ = launch.__qualname__ = name
    return launch


def aot_spec(label: str, kernel: Callable, signature: dict, constexprs: dict, cfg, **extra: object) -> dict:
    """One entry of an op's ``aot_specs()``: ``kernel`` specialized with ``constexprs`` and the
    warps/stages of the :class:`triton.Config` ``cfg`` (``extra``: ``dtypes``, ``divisible``)."""
    return {
        "label": label, "kernel": kernel, "signature": signature, "constexprs": constexprs,
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **extra,
    }  # fmt: skip


def row_aot_specs(
    op: str, kernel: Callable, signature: dict, flags: dict[str, str], variants: list[tuple[bool, ...]]
) -> list[dict]:
    """The ``aot_specs()`` of a row kernel launched by :func:`launch_rows`.

    Every row block and warp count with the first of ``variants`` (values of the constexpr
    ``flags``, each with its short name for the labels; the first is the heaviest: most live
    registers); the other variants with the first warp count of BERT's row blocks (512, 1024:
    hidden 384..1024); BLOCK_H 512 without the divisibility hints (``divisible=False``: hidden % 16
    != 0, e.g. TinyBERT's 312).
    """
    specs = []
    for block in ROW_BLOCKS:
        for i, cfg in enumerate(row_configs(block)):
            for j, values in enumerate(variants):
                if j > 0 and (i > 0 or block not in (512, 1024)):
                    continue
                consts = dict(zip(flags, values))
                words = " ".join(f"{flags[k]}={v}" for k, v in consts.items())
                label = f"{op} BLOCK_H={block} {words} w={cfg.num_warps}"
                specs.append(aot_spec(label, kernel, signature, {**consts, "BLOCK_H": block}, cfg))
    # hidden % 16 != 0 (TinyBERT's 312 -> BLOCK_H 512): strides and n_cols lose the divisibility hint.
    base = next(s for s in specs if s["constexprs"]["BLOCK_H"] == 512)
    specs.append(dict(base, label=base["label"] + " hidden%16!=0", divisible=False))
    return specs


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (R, H) with unit column stride; a view whenever possible."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2
