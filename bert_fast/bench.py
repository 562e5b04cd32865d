"""End-to-end benchmark: bert_fast against what users would otherwise run, side by side.

``python -m bert_fast bench`` (see :mod:`bert_fast.cli`) calls :func:`run`. This module measures
and writes data (JSON + CSV); :mod:`bert_fast.plot` reads the JSON and never measures.

What is measured, per cell (model, device, dtype, batch, seq_len, padding profile) and provider:

* providers (all in one process, on the same inputs, one after another):

  - ``bert_fast`` (auto backend) and ``bert_fast-triton`` / ``bert_fast-cpp`` / ``bert_fast-torch``
    (backend forced through :func:`bert_fast.optimize`);
  - ``hf-eager`` / ``hf-sdpa``: transformers' ``BertModel`` with that attention implementation;
  - ``hf-sdpa-compile``: ``torch.compile`` of the HF sdpa model (default mode);
  - ``onnxruntime``: the HF model exported to ONNX with dynamic (batch, sequence) axes and run
    through ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (its fused
    Attention / SkipLayerNormalization / BiasGelu operators); fp32 on CPU, fp16 on CUDA;
  - ``linear-floor``: only the model's linear layers (QKV, attention output, FFN up, FFN down of
    every layer, in the cell's dtype) on the real tokens of the batch packed into one
    (tokens, hidden) matrix: the GEMM time that padding-free execution could approach.

* timing: eval mode, ``torch.inference_mode``; ``warmup`` untimed calls, then ``repeats`` timed
  rounds. In each round every provider runs once, the starting provider rotating from round to
  round, so that load from other processes falls on all providers alike. CPU calls are timed with
  ``time.perf_counter`` (the calls are synchronous); CUDA calls with CUDA events. Reported: median
  and p90 latency, sequences/s and real (non-padding) tokens/s from the median.

* peak memory, from one extra untimed call per provider and cell (its output is also the one
  checked for accuracy):

  - CUDA: ``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it
    (weights and inputs excluded: the working memory of one forward).
  - CPU: growth of the process's peak resident set size during the call. Linux resets the peak
    (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``; before the call, free heap
    memory is handed back to the OS (``malloc_trim``) so that memory freed by earlier calls and
    reused counts again. Everything the process touches is included (oneDNN scratch), memory
    mapped but never touched is not. Unavailable (``None``) off Linux.
  - ONNX Runtime: no number (``None``). On CPU it keeps its working memory in its own arena from
    one run to the next (the growth of RSS reads 0); on CUDA it allocates outside PyTorch's
    allocator.

* accuracy: max |output - HF fp32 eager output| of ``last_hidden_state`` over valid (non-padding)
  tokens. Padded positions are each implementation's to define and are not compared.

* on CUDA, MFU: useful FLOPs (linear layers and attention on real tokens only, see
  :func:`model_flops`) per second over the device's peak dense FLOP/s for the dtype, from the
  vendor's datasheet (:data:`GPU_PEAK_TFLOPS`) or ``--peak-tflops``; the peak used is in each record.

A provider that cannot run on the device is reported with status ``unavailable`` and the reason; a
provider that fails is reported ``error`` with the message, and the run goes on. Cells not started
before ``time_budget_s`` ran out are ``skipped``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

SCHEMA_VERSION = 1

#: Model presets: random weights from these configurations (seeded), no download.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PRESET_COMMON = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")

PROVIDERS = (
    "bert_fast",
    "bert_fast-triton",
    "bert_fast-cpp",
    "bert_fast-torch",
    "hf-eager",
    "hf-sdpa",
    "hf-sdpa-compile",
    "onnxruntime",
    "linear-floor",
)
BASELINE = "hf-sdpa"
PROFILES = ("fixed", "varlen", "issue6")
#: The reference workload of issue 6 (CPU speed): batch 8, these lengths, padded to 128.
ISSUE6_LENGTHS = (128, 16, 72, 40, 100, 24, 88, 56)
STATUSES = ("ok", "unavailable", "error", "skipped")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Peak dense (no sparsity) tensor-core TFLOP/s for fp16/bf16 and non-tensor fp32, from NVIDIA's
#: datasheets, matched as a substring of ``torch.cuda.get_device_name()`` (first match wins).
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0}),
    ("H100", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),
    ("H200", {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"fp16": 362.05, "bf16": 362.05, "fp32": 91.6}),
    ("L4", {"fp16": 121.0, "bf16": 121.0, "fp32": 30.3}),
)

#: Keys every record has (values may be ``None`` where they do not apply).
RECORD_KEYS = (
    "model",
    "device",
    "dtype",
    "batch",
    "seq_len",
    "profile",
    "provider",
    "status",
    "reason",
    "real_tokens",
    "padding_fraction",
    "lengths",
    "repeats",
    "warmup",
    "latency_ms_median",
    "latency_ms_p90",
    "latency_ms_min",
    "latencies_ms",
    "seqs_per_s",
    "tokens_per_s",
    "peak_mem_mb",
    "speedup_vs_hf_sdpa",
    "max_abs_err",
    "flops",
    "achieved_tflops",
    "mfu",
    "peak_tflops",
    "setup_s",
    "warmup_s",
    "backend",
    "notes",
    "torch",
    "transformers",
    "bert_fast",
    "onnxruntime",
    "device_name",
    "threads",
    "git_revision",
)


@dataclasses.dataclass
class Settings:
    """Everything that defines a run; stored verbatim in the results."""

    models: list[str] = dataclasses.field(default_factory=lambda: ["base"])
    device: str = "auto"
    dtypes: list[str] | None = None
    batch_sizes: list[int] | None = None
    seq_lens: list[int] | None = None
    profiles: list[str] | None = None
    providers: list[str] = dataclasses.field(default_factory=lambda: list(PROVIDERS))
    repeats: int | None = None
    warmup: int | None = None
    out_dir: str = "bench_out"
    seed: int = 0
    threads: int | None = None
    varlen_min_fraction: float = 0.125
    time_budget_s: float | None = None
    compile_dynamic: str = "auto"
    peak_tflops: float | None = None

    def resolve_defaults(self, device: torch.device) -> Settings:
        """Fill the grid left open with the default for ``device`` (see :func:`default_grid`)."""
        grid = default_grid(device)
        out = dataclasses.replace(self)
        for key, value in grid.items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        return out


def default_grid(device: torch.device) -> dict[str, Any]:
    """The grid used for options not given on the command line.

    CPU: sized to finish well within 5 minutes on a shared 2-core machine with every provider: one
    batch shape (8 x 128) shared by the issue-6 workload and the unpadded one, so that
    ``torch.compile`` compiles once, in fp32 only (each further dtype costs another compile, about
    a minute there, and another full set of cells; ask for it with ``--dtypes fp32,bf16``).
    """
    if device.type == "cuda":
        return dict(
            dtypes=["fp16", "bf16"],
            batch_sizes=[8, 32],
            seq_lens=[128, 512],
            profiles=["fixed", "varlen", "issue6"],
            repeats=20,
            warmup=3,
        )
    return dict(
        dtypes=["fp32"], batch_sizes=[8], seq_lens=[128], profiles=["issue6", "fixed"], repeats=3, warmup=1
    )


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    profile: str
    batch: int
    seq_len: int
    lengths: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / (self.batch * self.seq_len)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    def kwargs(self) -> dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, token_type_ids=self.token_type_ids)


def profile_lengths(profile: str, batch: int, seq_len: int, seed: int, min_fraction: float = 0.125) -> list[int]:
    """Sequence lengths of a padding profile.

    * ``fixed``: every sequence ``seq_len`` long (no padding).
    * ``varlen``: uniform integers in ``[ceil(seq_len * min_fraction), seq_len]`` from a generator
      seeded with ``(seed, batch, seq_len)``; then the longest is set to ``seq_len``, so the batch
      is padded to exactly ``seq_len`` (what a tokenizer's ``padding="longest"`` gives).
    * ``issue6``: :data:`ISSUE6_LENGTHS` (batch 8, padded to 128) whatever the grid says.
    """
    if profile == "fixed":
        return [seq_len] * batch
    if profile == "issue6":
        return list(ISSUE6_LENGTHS)
    if profile == "varlen":
        low = max(1, math.ceil(seq_len * min_fraction))
        gen = torch.Generator().manual_seed((seed * 1_000_003 + batch * 1009 + seq_len) & 0x7FFFFFFF)
        lengths = torch.randint(low, seq_len + 1, (batch,), generator=gen).tolist()
        lengths[max(range(batch), key=lambda i: lengths[i])] = seq_len
        return lengths
    raise ValueError(f"unknown padding profile {profile!r}; expected one of {', '.join(PROFILES)}")


def make_workload(
    profile: str, batch: int, seq_len: int, vocab_size: int, seed: int, device: torch.device, min_fraction: float
) -> Workload:
    if profile == "issue6":
        batch, seq_len = len(ISSUE6_LENGTHS), max(ISSUE6_LENGTHS)
    lengths = profile_lengths(profile, batch, seq_len, seed, min_fraction)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + seq_len)
    ids = torch.randint(1, vocab_size, (batch, seq_len), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # id 0 ([PAD] in BERT vocabularies) at padded positions
    return Workload(profile, batch, seq_len, lengths, ids.to(device), mask.to(device), torch.zeros_like(ids).to(device))


def model_flops(config, lengths: Sequence[int], linear_only: bool = False) -> float:
    """Useful FLOPs of one forward on sequences of ``lengths`` (padding excluded).

    Per layer: the four linear layers, 2 N (4 H^2 + 2 H I), and attention, 4 H sum(L_i^2)
    (QK^T and PV); plus the pooler, 2 B H^2. Softmax, LayerNorm, GELU and embeddings are
    O(N H) and left out. ``linear_only``: the linear layers only (the ``linear-floor`` work).
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = sum(lengths)
    linear = 2.0 * n * (4 * h * h + 2 * h * inter)
    if linear_only:
        return layers * linear
    attention = 4.0 * h * sum(length * length for length in lengths)
    return layers * (linear + attention) + 2.0 * len(lengths) * h * h


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_revision() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", None)


def _command_line() -> str | None:
    if not sys.argv:
        return None
    prog = os.path.basename(sys.argv[0])
    if prog == "__main__.py":  # python -m bert_fast
        prog = "python -m bert_fast"
    return shlex.join([prog, *sys.argv[1:]])


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    import bert_fast
    from bert_fast.kernels import _backend

    ext = _backend.load_cpp_extension()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bert_fast": bert_fast.__version__,
        "onnxruntime": _version("onnxruntime"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cpp_extension": ext is not None,
        "cpp_extension_isa": getattr(ext, "CPU_ISA", None) if ext is not None else None,
        "git_revision": git_revision(),
        "command": _command_line(),
    }


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call takes (CUDA events on CUDA, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def cpu_peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


def measure_memory(fn: Callable[[], Any], device: torch.device, external: bool = False) -> tuple[Any, float | None]:
    """Run ``fn`` once; return (its result, peak memory in MiB or ``None``). See the module docstring."""
    gc.collect()
    if external:  # memory held or allocated where these probes cannot see it (ONNX Runtime)
        out = fn()
        _sync(device)
        return out, None
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not cpu_peak_rss_supported():
        return fn(), None
    _malloc_trim()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _read_status_kb("VmRSS")
    out = fn()
    peak = _read_status_kb("VmHWM")
    if before is None or peak is None:
        return out, None
    return out, max(0, peak - before) / 1024


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gpu_peak_tflops(name: str, dtype: str, override: float | None) -> tuple[float | None, str | None]:
    if override is not None:
        return override, "--peak-tflops"
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks.get(dtype), f"NVIDIA datasheet, {key}, dense {dtype}"
    return None, None


# --------------------------------------------------------------------------------------------------
# Models and providers
# --------------------------------------------------------------------------------------------------


def load_base_model(spec: str, device: torch.device, seed: int):
    """(fp32 HF eager BertModel in eval mode, display name, source description)."""
    import transformers

    if spec in PRESETS:
        config = transformers.BertConfig(**PRESET_COMMON, **PRESETS[spec])
        torch.manual_seed(seed)
        model = transformers.BertModel._from_config(config, attn_implementation="eager", dtype=torch.float32)
        source = f"preset {spec}: random weights, seed {seed}"
        name = spec
    elif os.path.isdir(spec):
        model = transformers.BertModel.from_pretrained(
            spec, attn_implementation="eager", dtype=torch.float32, local_files_only=True
        )
        source = f"checkpoint {os.path.abspath(spec)}"
        name = os.path.basename(os.path.normpath(spec))
    else:
        raise SystemExit(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a local checkpoint directory")
    return model.to(device).eval(), name, source


def share_weights(model):
    """A deep copy of ``model`` (config included) that shares its parameters (no weight copy)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


class Unavailable(Exception):
    """The provider cannot run on this device / dtype."""


@dataclasses.dataclass
class Provider:
    name: str
    call: Callable[[Workload], torch.Tensor | None] | None = None
    prepare: Callable[[Workload], Callable[[], Any]] | None = None
    unavailable: str | None = None
    error: str | None = None
    setup_s: float = 0.0
    backend: str | None = None
    notes: str | None = None
    external_memory: bool = False

    def bind(self, w: Workload) -> Callable[[], Any]:
        """A zero-argument callable running this provider on ``w`` (input preparation not timed)."""
        if self.prepare is not None:
            return self.prepare(w)
        kwargs = w.kwargs()
        return lambda: self.call(**kwargs)  # type: ignore[misc]


def _hf_provider(typed, impl: str):
    model = share_weights(typed)
    model.set_attn_implementation(impl)
    return lambda **kw: model(**kw).last_hidden_state


def _bert_fast_provider(typed, backend: str, device: torch.device):
    import bert_fast

    model = bert_fast.optimize(share_weights(typed), backend=backend)
    return lambda **kw: model(**kw).last_hidden_state


def _auto_backend(device: torch.device) -> str:
    from bert_fast.kernels import _backend

    return _backend.resolve("bias_residual_layer_norm", device, "auto")


def _linear_floor(typed, device: torch.device, dtype: torch.dtype, seed: int):
    layers = []
    for layer in typed.encoder.layer:
        sa = layer.attention.self
        w_qkv = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
        b_qkv = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        layers.append(
            (
                w_qkv,
                b_qkv,
                layer.attention.output.dense.weight,
                layer.attention.output.dense.bias,
                layer.intermediate.dense.weight,
                layer.intermediate.dense.bias,
                layer.output.dense.weight,
                layer.output.dense.bias,
            )
        )
    hidden = typed.config.hidden_size
    linear = torch.nn.functional.linear

    def prepare(w: Workload) -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(w.real_tokens, hidden, generator=gen).to(device=device, dtype=dtype)

        def run() -> None:
            # Every layer starts from the same packed input: the GEMM shapes and bytes are the
            # model's, without chaining 12+ layers of un-normalized products.
            for w_qkv, b_qkv, w_o, b_o, w_i, b_i, w_d, b_d in layers:
                linear(x, w_qkv, b_qkv)
                h = linear(x, w_o, b_o)
                u = linear(h, w_i, b_i)
                linear(u, w_d, b_d)
            return None

        return run

    return prepare


def _onnx_export(base, workdir: str) -> tuple[str, str]:
    """Export fp32 ``base`` to ONNX with dynamic (batch, sequence) axes; returns (path, exporter)."""

    class _Wrap(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    # Export on CPU in fp32. On CUDA this needs a real copy: .cpu() on a weight-sharing copy would
    # move the shared Parameters of ``base`` too.
    bert = share_weights(base) if base.device.type == "cpu" else copy.deepcopy(base).cpu()
    wrapped = _Wrap(bert).eval()
    # A sample with padding in one row, so the traced graph keeps the masking path.
    ids = torch.randint(1, base.config.vocab_size, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    args = (ids * mask, mask, torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    path = os.path.join(workdir, "model.onnx")
    import warnings

    # The TorchScript exporter (dynamo=False, dynamic_axes) yields the graph pattern that ONNX
    # Runtime's BERT fusions (Attention, EmbedLayerNormalization) recognize; the dynamo exporter's
    # graph (torch 2.9+ default) gets SkipLayerNormalization/BiasGelu but no fused Attention.
    # Fall back to the dynamo exporter (dynamic_shapes) if the TorchScript one is gone.
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                args,
                path,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        return path, "torchscript"
    except Exception as exc:  # noqa: BLE001 - any failure: try the other exporter
        first = f"{type(exc).__name__}: {exc}"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                args,
                path,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                dynamo=True,
                external_data=False,
            )
    except Exception as exc:
        raise RuntimeError(f"ONNX export failed: torchscript exporter: {first}; dynamo exporter: {exc}") from exc
    return path, "dynamo"


def _onnxruntime_provider(base, device: torch.device, dtype_name: str, threads: int) -> Provider:
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:
        raise Unavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from exc
    if device.type == "cuda":
        if dtype_name != "fp16":
            raise Unavailable("the onnxruntime provider runs fp16 on CUDA (fp32 on CPU)")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    elif dtype_name != "fp32":
        raise Unavailable("the onnxruntime provider runs fp32 on CPU (fp16 on CUDA)")

    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="bert_fast_onnx_") as workdir:
        path, exporter = _onnx_export(base, workdir)
        cfg = base.config
        opt = optimize_model(
            path, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size, use_gpu=gpu
        )
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if gpu:
            opt.convert_float_to_float16(keep_io_types=True)
        opt_path = os.path.join(workdir, "model_opt.onnx")
        opt.save_model_to_file(opt_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads if not gpu else 0
        # ONNX Runtime's pool threads spin after each run by default; in one process with
        # PyTorch's OpenMP threads on the same cores they steal the CPU the next provider needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(opt_path, so, providers=providers)
    notes = f"exporter {exporter}; fused ops " + ", ".join(f"{k} x{v}" for k, v in sorted(fused.items()))
    if not gpu:
        notes += f"; intra_op_num_threads {threads}, allow_spinning 0"
    hidden = cfg.hidden_size
    names = ("input_ids", "attention_mask", "token_type_ids")

    def prepare(w: Workload) -> Callable[[], Any]:
        if not gpu:
            feeds = {n: t.cpu().numpy() for n, t in zip(names, (w.input_ids, w.attention_mask, w.token_type_ids))}
            return lambda: torch.from_numpy(sess.run(["last_hidden_state"], feeds)[0])
        import numpy as np

        binding = sess.io_binding()
        inputs = [t.contiguous() for t in (w.input_ids, w.attention_mask, w.token_type_ids)]
        for n, t in zip(names, inputs):
            binding.bind_input(n, "cuda", device.index or 0, np.int64, tuple(t.shape), t.data_ptr())
        out = torch.empty(w.batch, w.seq_len, hidden, dtype=torch.float32, device=device)
        binding.bind_output(
            "last_hidden_state", "cuda", device.index or 0, np.float32, tuple(out.shape), out.data_ptr()
        )

        def run():
            sess.run_with_iobinding(binding)
            return out

        return run

    notes += "; peak memory not measured (ONNX Runtime's own arena/allocator)"
    return Provider("onnxruntime", prepare=prepare, notes=notes, external_memory=True, backend=providers[0])


def build_provider(
    name: str, base, typed, device: torch.device, dtype_name: str, settings: Settings, onnx_cache: dict
) -> Provider:
    """Set up provider ``name``; never raises (the failure is recorded in the Provider)."""
    t0 = time.perf_counter()
    prov = Provider(name)
    try:
        if name.startswith("bert_fast"):
            backend = "auto" if name == "bert_fast" else name.split("-", 1)[1]
            if backend == "triton" and device.type != "cuda":
                raise Unavailable(
                    "the Triton kernels need a CUDA device (the Triton interpreter on CPU is for tests, "
                    "far too slow to benchmark)"
                )
            prov.call = _bert_fast_provider(typed, backend, device)
            prov.backend = _auto_backend(device) if backend == "auto" else backend
        elif name == "hf-eager":
            prov.call = _hf_provider(typed, "eager")
        elif name == "hf-sdpa":
            prov.call = _hf_provider(typed, "sdpa")
        elif name == "hf-sdpa-compile":
            model = share_weights(typed)
            model.set_attn_implementation("sdpa")
            dynamic = {"auto": None, "true": True, "false": False}[settings.compile_dynamic]
            compiled = torch.compile(model, dynamic=dynamic)
            prov.call = lambda **kw: compiled(**kw).last_hidden_state
            prov.notes = f"torch.compile(mode=default, dynamic={dynamic}); compile time is in warmup_s"
        elif name == "onnxruntime":
            key = dtype_name
            if key not in onnx_cache:
                onnx_cache[key] = _onnxruntime_provider(base, device, dtype_name, torch.get_num_threads())
            prov = dataclasses.replace(onnx_cache[key])
        elif name == "linear-floor":
            prov.prepare = _linear_floor(typed, device, DTYPES[dtype_name], settings.seed)
            prov.notes = "linear layers only on packed real tokens; no model output (no error check)"
        else:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    except Unavailable as exc:
        prov.unavailable = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        prov.error = _describe(exc)
    prov.setup_s = time.perf_counter() - t0
    return prov


def _describe(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    if os.environ.get("BERT_FAST_BENCH_TRACEBACK"):
        msg += "\n" + traceback.format_exc()
    return msg[:2000]


def _is_unavailable(exc: BaseException) -> bool:
    from bert_fast import BackendUnavailableError

    return isinstance(exc, (BackendUnavailableError, Unavailable))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_triton_interpreter(device: torch.device) -> Iterator[None]:
    """On CPU, keep the Triton interpreter (a test tool) out of the benchmark's ``auto`` backend."""
    old = os.environ.get("TRITON_INTERPRET")
    if device.type == "cpu" and old not in (None, "", "0"):
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _cells(settings: Settings) -> list[tuple[str, int, int]]:
    """(profile, batch, seq_len) in run order; issue6 appears once (it fixes its own shape)."""
    out: list[tuple[str, int, int]] = []
    for batch in settings.batch_sizes or []:
        for seq_len in settings.seq_lens or []:
            for profile in settings.profiles or []:
                cell = (profile, 8, 128) if profile == "issue6" else (profile, batch, seq_len)
                if cell not in out:
                    out.append(cell)
    return out


def _validate(settings: Settings) -> None:
    for d in settings.dtypes or []:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    for p in settings.profiles or []:
        if p not in PROFILES:
            raise SystemExit(f"unknown padding profile {p!r}; expected one of {', '.join(PROFILES)}")
    for p in settings.providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; expected one of {', '.join(PROVIDERS)}")
    if settings.repeats is not None and settings.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if settings.warmup is not None and settings.warmup < 0:
        raise SystemExit("--warmup must be 0 or more")
    if settings.compile_dynamic not in ("auto", "true", "false"):
        raise SystemExit("--compile-dynamic must be auto, true or false")


def run(settings: Settings, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark grid; return ``{"schema", "meta", "settings", "records"}`` (not written)."""
    from tqdm.auto import tqdm

    _validate(settings)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings = settings.resolve_defaults(device)
    _validate(settings)
    started = time.perf_counter()
    meta = environment(device)
    meta["peak_memory_method"] = (
        "CUDA max_memory_allocated during one forward minus memory allocated before it"
        if device.type == "cuda"
        else "growth of peak RSS (VmHWM after /proc/self/clear_refs reset, after malloc_trim) during one forward"
    )
    meta["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # Other processes' load explains noisy timings on a shared machine: record it.
    meta["loadavg_start"] = _loadavg()
    env_cols = {k: meta[k] for k in ("torch", "transformers", "bert_fast", "onnxruntime", "device_name", "threads")}
    env_cols["git_revision"] = meta["git_revision"]

    cells = _cells(settings)
    n_prov = len(settings.providers)
    per_cell_calls = settings.warmup + settings.repeats + 1
    total = len(settings.models) * len(cells) * len(settings.dtypes) * n_prov * per_cell_calls
    bar = tqdm(total=total, disable=not progress, unit="call", dynamic_ncols=True, file=sys.stderr)
    records: list[dict[str, Any]] = []
    budget = settings.time_budget_s

    with _no_triton_interpreter(device):
        for mi, spec in enumerate(settings.models):
            deadline = None if budget is None else started + budget * (mi + 1) / len(settings.models)
            bar.set_description(f"{spec}: building")
            base, model_name, source = load_base_model(spec, device, settings.seed)
            config = base.config
            # Typed copies (weights cast once per dtype) and their providers, all kept alive so
            # that every cell measures all providers in interleaved rounds.
            groups: dict[str, tuple[Any, list[Provider]]] = {}
            onnx_cache: dict[str, Provider] = {}
            for dname in settings.dtypes:
                typed = base if dname == "fp32" else copy.deepcopy(base).to(DTYPES[dname])
                provs = []
                for pname in settings.providers:
                    bar.set_description(f"{model_name} {dname}: setting up {pname}")
                    provs.append(build_provider(pname, base, typed, device, dname, settings, onnx_cache))
                groups[dname] = (typed, provs)

            for profile, batch, seq_len in cells:
                w = make_workload(
                    profile, batch, seq_len, config.vocab_size, settings.seed, device, settings.varlen_min_fraction
                )
                cell_base = dict(
                    model=model_name,
                    model_source=source,
                    device=str(device),
                    batch=w.batch,
                    seq_len=w.seq_len,
                    profile=profile,
                    real_tokens=w.real_tokens,
                    padding_fraction=round(w.padding_fraction, 6),
                    lengths=list(w.lengths),
                    repeats=settings.repeats,
                    warmup=settings.warmup,
                )
                if deadline is not None and time.perf_counter() > deadline:
                    for dname in settings.dtypes:
                        for prov in groups[dname][1]:
                            records.append(
                                _record(cell_base, dname, prov.name, "skipped", f"time budget of {budget:g} s reached")
                            )
                            bar.update(per_cell_calls)
                    continue
                with torch.inference_mode():
                    bar.set_description(f"{model_name} {w.batch}x{w.seq_len} {profile}: fp32 eager reference")
                    ref = base(**w.kwargs()).last_hidden_state.float()[w.valid]
                    for dname in settings.dtypes:
                        records.extend(
                            _measure_cell(
                                groups[dname][1], w, cell_base, dname, config, device, settings, ref, bar, model_name
                            )
                        )
                del ref
            del groups, onnx_cache, base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()

    _add_speedups(records)
    for r in records:
        r.update(env_cols)
    meta["wall_s"] = round(time.perf_counter() - started, 3)
    meta["loadavg_end"] = _loadavg()
    return {
        "schema": SCHEMA_VERSION,
        "meta": meta,
        "settings": dataclasses.asdict(settings),
        "records": [{k: r.get(k) for k in (*RECORD_KEYS, "model_source")} for r in records],
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _record(cell_base: dict, dtype: str, provider: str, status: str, reason: str | None = None, **kw) -> dict:
    rec = dict(cell_base, dtype=dtype, provider=provider, status=status, reason=reason)
    rec.update(kw)
    return rec


def _measure_cell(
    provs: list[Provider],
    w: Workload,
    cell_base: dict,
    dname: str,
    config,
    device: torch.device,
    settings: Settings,
    ref: torch.Tensor,
    bar,
    model_name: str,
) -> list[dict]:
    per_cell_calls = settings.warmup + settings.repeats + 1
    label = f"{model_name} {dname} {w.batch}x{w.seq_len} {w.profile}"
    state: dict[str, dict[str, Any]] = {}
    runnable: list[Provider] = []
    for prov in provs:
        st = state[prov.name] = {"times": [], "warmup_s": 0.0, "status": "ok", "reason": None}
        if prov.unavailable or prov.error:
            if prov.unavailable:
                st["status"], st["reason"] = "unavailable", prov.unavailable
            else:
                st["status"], st["reason"] = "error", prov.error
            bar.update(per_cell_calls)
            continue
        bar.set_description(f"{label}: warmup {prov.name}")
        try:
            fn = prov.bind(w)
            st["fn"] = fn
            for _ in range(settings.warmup):
                st["warmup_s"] += time_call(fn, device)
                bar.update(1)
        except Exception as exc:  # noqa: BLE001
            _fail(st, exc, prov)
            bar.update(per_cell_calls)
            continue
        runnable.append(prov)

    # Timed rounds: every runnable provider once per round, the starting one rotating.
    for r in range(settings.repeats):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)] if runnable else []
        for prov in order:
            st = state[prov.name]
            if st["status"] != "ok":
                continue
            bar.set_description(f"{label}: round {r + 1}/{settings.repeats}")
            try:
                st["times"].append(time_call(st["fn"], device))
            except Exception as exc:  # noqa: BLE001
                _fail(st, exc, prov)
                bar.update(settings.repeats - r)
                continue
            bar.update(1)

    out = []
    for prov in provs:
        st = state[prov.name]
        extra: dict[str, Any] = dict(setup_s=round(prov.setup_s, 3), backend=prov.backend, notes=prov.notes)
        if st["status"] == "ok":
            bar.set_description(f"{label}: memory/accuracy {prov.name}")
            try:
                res, peak = measure_memory(st["fn"], device, external=prov.external_memory)
            except Exception as exc:  # noqa: BLE001
                _fail(st, exc, prov)
                res, peak = None, None
            bar.update(1)
        if st["status"] != "ok":
            out.append(_record(cell_base, dname, prov.name, st["status"], st["reason"], **extra))
            continue
        times = st["times"]
        med = percentile(times, 50)
        err = None
        if res is not None:
            err = float((res.float()[w.valid] - ref).abs().max().item())
        flops = model_flops(config, w.lengths, linear_only=prov.name == "linear-floor")
        peak_tf, peak_src = (None, None)
        if device.type == "cuda":
            peak_tf, peak_src = gpu_peak_tflops(torch.cuda.get_device_name(device), dname, settings.peak_tflops)
        achieved = flops / med / 1e12
        if peak_src:
            extra["notes"] = "; ".join(x for x in (extra["notes"], f"peak {peak_tf} TFLOP/s from {peak_src}") if x)
        out.append(
            _record(
                cell_base,
                dname,
                prov.name,
                "ok",
                None,
                latency_ms_median=med * 1e3,
                latency_ms_p90=percentile(times, 90) * 1e3,
                latency_ms_min=min(times) * 1e3,
                latencies_ms=[t * 1e3 for t in times],
                seqs_per_s=w.batch / med,
                tokens_per_s=w.real_tokens / med,
                peak_mem_mb=peak,
                max_abs_err=err,
                flops=flops,
                achieved_tflops=achieved,
                mfu=(achieved / peak_tf) if peak_tf else None,
                peak_tflops=peak_tf,
                warmup_s=round(st["warmup_s"], 3),
                **extra,
            )
        )
        st.pop("fn", None)
    return out


def _fail(st: dict, exc: BaseException, prov: Provider) -> None:
    st["status"] = "unavailable" if _is_unavailable(exc) else "error"
    st["reason"] = str(exc) if _is_unavailable(exc) else _describe(exc)
    st.pop("fn", None)
    if st["status"] == "unavailable":
        prov.unavailable = st["reason"]  # no retry on later cells


def _add_speedups(records: list[dict]) -> None:
    key = ("model", "device", "dtype", "batch", "seq_len", "profile")
    base = {
        tuple(r[k] for k in key): r["latency_ms_median"]
        for r in records
        if r["provider"] == BASELINE and r["status"] == "ok"
    }
    for r in records:
        b = base.get(tuple(r[k] for k in key))
        r["speedup_vs_hf_sdpa"] = (b / r["latency_ms_median"]) if (b and r.get("latency_ms_median")) else None


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

CSV_COLUMNS = [k for k in RECORD_KEYS if k not in ("lengths", "latencies_ms")]


def write_results(results: dict[str, Any], out_dir: str, name: str = "results") -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    csv_path = os.path.join(out_dir, f"{name}.csv")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=1)
        f.write("\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rec in results["records"]:
            writer.writerow({k: _csv_value(rec.get(k)) for k in CSV_COLUMNS})
    return json_path, csv_path


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return re.sub(r"\s+", " ", v) if isinstance(v, str) else v


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: one line per record, reasons for non-ok records as footnotes."""
    head = (
        f"{'model':<8} {'dtype':<5} {'BxL':>8} {'profile':<7} {'pad%':>5} {'provider':<16} {'status':<11} "
        f"{'median ms':>10} {'p90 ms':>9} {'seq/s':>8} {'tok/s':>9} {'mem MB':>7} {'x sdpa':>7} {'max err':>8}"
    )
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    prev = None
    for r in results["records"]:
        group = (r["model"], r["dtype"], r["batch"], r["seq_len"], r["profile"])
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        status = r["status"]
        if status != "ok":
            reason = (r.get("reason") or "").splitlines()[0] if r.get("reason") else ""
            if reason not in notes:
                notes.append(reason)
            status = f"{status}[{notes.index(reason) + 1}]"
        mem = r.get("peak_mem_mb")
        ratio = r.get("speedup_vs_hf_sdpa")
        ratio_s = f"{ratio:.2f}x" if ratio else "-"
        lines.append(
            f"{r['model']:<8} {r['dtype']:<5} {str(r['batch']) + 'x' + str(r['seq_len']):>8} {r['profile']:<7} "
            f"{100 * r['padding_fraction']:>5.1f} {r['provider']:<16} {status:<11} "
            f"{_fmt(r.get('latency_ms_median'), '10.2f'):>10} {_fmt(r.get('latency_ms_p90'), '9.2f'):>9} "
            f"{_fmt(r.get('seqs_per_s'), '8.1f'):>8} {_fmt(r.get('tokens_per_s'), '9.0f'):>9} "
            f"{_fmt(mem, '7.0f'):>7} {ratio_s:>7} "
            f"{_fmt(r.get('max_abs_err'), '8.1e'):>8}"
        )
    if notes:
        lines.append("")
        lines.extend(f"[{i + 1}] {n}" for i, n in enumerate(notes))
    meta = results["meta"]
    lines.append("")
    lines.append(
        f"{meta['device_name']} | torch {meta['torch']} | transformers {meta['transformers']} | "
        f"onnxruntime {meta['onnxruntime']} | threads {meta['threads']} | wall {meta.get('wall_s')} s"
    )
    return "\n".join(lines)
