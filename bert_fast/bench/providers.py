"""Providers: what is measured, one registry from name to factory.

A provider is one way to run the model on a batch. :data:`REGISTRY` maps each name to a factory
``factory(ctx: Context) -> Provider``; :func:`register` adds one (a plugin, a test double);
:func:`build_provider` builds one and never raises: a provider that cannot run here is returned
``unavailable`` with the reason, one that fails ``error`` with the message.

Built in (in this order):

* ``bert_fast`` (auto backend) and ``bert_fast-triton`` / ``bert_fast-cpp`` / ``bert_fast-torch``
  (backend forced through :func:`bert_fast.optimize`);
* ``bert_fast-graphs``: ``bert_fast.optimize(cuda_graphs=True)`` (CUDA only): the encoder replayed
  from a CUDA graph per shape bucket (:mod:`bert_fast.cuda_graphs`);
* ``hf-eager`` / ``hf-sdpa``: the transformers base model (``BertModel``, ``RobertaModel``,
  ``DistilBertModel``, ...) with that attention implementation;
* ``hf-sdpa-compile``: ``torch.compile`` of the HF sdpa model (default mode);
* ``hf-compile-freezing``: ``torch.compile`` of the HF sdpa model with inductor ``freezing=True``,
  called under ``torch.no_grad`` (CPU: weights folded as constants and prepacked for oneDNN,
  bias/activation epilogues fused);
* ``onnxruntime``, ``openvino``: the HF model in those engines (:mod:`bert_fast.bench.engines`);
* ``linear-floor``: only the model's linear layers (QKV, attention output, FFN up, FFN down of
  every layer, in the cell's dtype) on the real tokens of the batch packed into one
  (tokens, hidden) matrix: the GEMM time that padding-free execution could approach.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .workloads import DTYPES, Batch


class Unavailable(Exception):
    """The provider cannot run on this device / dtype / installation; the message says why."""


@dataclasses.dataclass
class Provider:
    """A built provider: ``call(**batch_kwargs)`` or ``prepare(batch) -> fn`` runs it."""

    name: str
    call: Callable[..., torch.Tensor | None] | None = None
    prepare: Callable[[Batch], Callable[[], Any]] | None = None
    unavailable: str | None = None
    error: str | None = None
    setup_s: float = 0.0
    compile_s: float | None = None  # ahead-of-time compile (engines), apart from setup_s and run time
    backend: str | None = None
    notes: str | None = None
    external_memory: bool = False

    def bind(self, batch: Batch) -> Callable[[], Any]:
        """A zero-argument callable running this provider on ``batch`` (input preparation not timed)."""
        if self.prepare is not None:
            return self.prepare(batch)
        kwargs = batch.kwargs()
        call = self.call
        assert call is not None, f"provider {self.name} has neither call nor prepare"
        return lambda: call(**kwargs)


@dataclasses.dataclass
class Context:
    """What a factory builds from: the models of one (model, dtype) and the run's settings."""

    base: Any  # HF base model of a BERT family (BertModel, RobertaModel, DistilBertModel, ...), fp32, eager
    # attention, eval mode, on ``device``
    typed: Any  # the same weights in ``dtype`` (``base`` itself for fp32)
    device: torch.device
    dtype: str  # a key of DTYPES
    seed: int = 0
    threads: int = 1
    compile_dynamic: str = "auto"  # auto | true | false
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # shared by the dtypes of one model


ProviderFactory = Callable[[Context], Provider]


@dataclasses.dataclass(frozen=True)
class ProviderSpec:
    name: str
    factory: ProviderFactory
    description: str


REGISTRY: dict[str, ProviderSpec] = {}


def register(name: str, description: str) -> Callable[[ProviderFactory], ProviderFactory]:
    """Decorator: ``@register("my-engine", "what it is")`` on a ``factory(ctx) -> Provider``."""

    def deco(factory: ProviderFactory) -> ProviderFactory:
        REGISTRY[name] = ProviderSpec(name, factory, description)
        return factory

    return deco


def provider_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def share_weights(model: Any) -> Any:
    """A deep copy of ``model`` (config included) that shares its parameters (no weight copy)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def _dynamic(ctx: Context) -> bool | None:
    return {"auto": None, "true": True, "false": False}[ctx.compile_dynamic]


#: Recompiles allowed per code object. Every compiled HF model of a run shares one code object
#: (``BertModel.forward``): two compile providers x dtypes x shapes pass dynamo's default of 8, after
#: which it silently runs the rest eagerly and the benchmark would time eager code as "compiled".
RECOMPILE_LIMIT = 256


def _allow_recompiles() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def _auto_backend(device: torch.device) -> str | None:
    """The backend ``auto`` picks on ``device`` (for the record), or ``None`` if it cannot be asked."""
    try:
        from bert_fast.kernels import _backend

        return _backend.resolve("bias_residual_layer_norm", device, "auto")
    except Exception:  # noqa: BLE001 - informational only
        return None


def _bert_fast(ctx: Context, backend: str) -> Provider:
    import bert_fast

    if backend == "triton" and ctx.device.type != "cuda":
        raise Unavailable(
            "the Triton kernels need a CUDA device (the Triton interpreter on CPU is for tests, "
            "far too slow to benchmark)"
        )
    model = bert_fast.optimize(share_weights(ctx.typed), backend=backend)
    name = "bert_fast" if backend == "auto" else f"bert_fast-{backend}"
    chosen = _auto_backend(ctx.device) if backend == "auto" else backend
    return Provider(name, call=lambda **kw: model(**kw).last_hidden_state, backend=chosen)


register("bert_fast", "bert_fast.optimize() of the HF model, backend auto")(
    functools.partial(_bert_fast, backend="auto")
)
for _backend_name in ("triton", "cpp", "torch"):
    register(f"bert_fast-{_backend_name}", f"bert_fast.optimize(backend={_backend_name!r})")(
        functools.partial(_bert_fast, backend=_backend_name)
    )


@register("bert_fast-graphs", "bert_fast.optimize(cuda_graphs=True): the encoder replayed from CUDA graphs (CUDA)")
def _bert_fast_graphs(ctx: Context) -> Provider:
    import bert_fast

    if ctx.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device (cuda_graphs=True is a no-op on CPU)")
    model = bert_fast.optimize(share_weights(ctx.typed), cuda_graphs=True)
    notes = "one graph per shape bucket, captured in the first warmup call (capture time is in warmup_s)"
    return Provider(
        "bert_fast-graphs", call=lambda **kw: model(**kw).last_hidden_state, backend=_auto_backend(ctx.device),
        notes=notes,
    )  # fmt: skip


def _hf_provider(typed: Any, impl: str) -> Callable[..., torch.Tensor]:
    model = share_weights(typed)
    model.set_attn_implementation(impl)
    return lambda **kw: model(**kw).last_hidden_state


@register("hf-eager", "transformers BertModel, eager attention")
def _hf_eager(ctx: Context) -> Provider:
    return Provider("hf-eager", call=_hf_provider(ctx.typed, "eager"))


@register("hf-sdpa", "transformers BertModel, sdpa attention (the baseline of every ratio)")
def _hf_sdpa(ctx: Context) -> Provider:
    return Provider("hf-sdpa", call=_hf_provider(ctx.typed, "sdpa"))


@register("hf-sdpa-compile", "torch.compile of the HF sdpa model (default mode)")
def _hf_compile(ctx: Context) -> Provider:
    model = share_weights(ctx.typed)
    model.set_attn_implementation("sdpa")
    _allow_recompiles()
    compiled = torch.compile(model, dynamic=_dynamic(ctx))
    notes = f"torch.compile(mode=default, dynamic={_dynamic(ctx)}); compile time is in warmup_s"
    return Provider("hf-sdpa-compile", call=lambda **kw: compiled(**kw).last_hidden_state, notes=notes)


@register("hf-compile-freezing", "torch.compile of the HF sdpa model, inductor freezing=True, under no_grad (CPU)")
def _hf_compile_freezing(ctx: Context) -> Provider:
    if ctx.device.type != "cpu":
        raise Unavailable("hf-compile-freezing is the CPU inductor path (prepacked oneDNN weights); on CUDA use "
                          "hf-sdpa-compile")  # fmt: skip
    model = share_weights(ctx.typed)
    model.set_attn_implementation("sdpa")
    _allow_recompiles()
    # options= scopes the inductor setting to this compile (the global config stays as it was).
    compiled = torch.compile(model, dynamic=_dynamic(ctx), options={"freezing": True})

    def call(**kw):
        with torch.no_grad():  # freezing folds the weights as constants only for no-grad graphs
            return compiled(**kw).last_hidden_state

    notes = f"torch.compile(dynamic={_dynamic(ctx)}, options={{'freezing': True}}); compile time is in warmup_s"
    return Provider("hf-compile-freezing", call=call, notes=notes)


@register("onnxruntime", "ONNX Runtime with its BERT fusions (fp32 on CPU, fp16 on CUDA)")
def _onnxruntime(ctx: Context) -> Provider:
    from .engines import onnxruntime_provider

    key = f"onnxruntime-{ctx.dtype}"
    if key not in ctx.cache:
        ctx.cache[key] = onnxruntime_provider(ctx)
    return dataclasses.replace(ctx.cache[key])


@register("openvino", "OpenVINO CPU plugin: convert_model of the HF model, INFERENCE_PRECISION_HINT = the dtype")
def _openvino(ctx: Context) -> Provider:
    from .engines import openvino_provider

    return openvino_provider(ctx)


@register("linear-floor", "the model's linear layers alone on the packed real tokens (GEMM floor)")
def _linear_floor(ctx: Context) -> Provider:
    from bert_fast.families import family_of

    model = ctx.typed
    fam = family_of(model)
    if fam is None:
        raise Unavailable(f"linear-floor: {type(model).__name__} is not a BERT-family base model")
    layers = []
    for layer in fam.layers(model):
        p = fam.layer(layer, model.config)  # the family's module names mapped onto one LayerParts
        layers.append((
            torch.cat([p.query.weight, p.key.weight, p.value.weight]),
            torch.cat([p.query.bias, p.key.bias, p.value.bias]),
            p.attn_out.weight,
            p.attn_out.bias,
            p.ffn_up.weight,
            p.ffn_up.bias,
            p.ffn_down.weight,
            p.ffn_down.bias,
        ))  # fmt: skip
    hidden = model.config.hidden_size
    linear = torch.nn.functional.linear
    dtype, device, seed = DTYPES[ctx.dtype], ctx.device, ctx.seed

    def prepare(batch: Batch) -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(sum(batch.lengths), hidden, generator=gen).to(device=device, dtype=dtype)

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

    notes = "linear layers only on packed real tokens; no model output (no error check)"
    return Provider("linear-floor", prepare=prepare, notes=notes)


def describe_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    if os.environ.get("BERT_FAST_BENCH_TRACEBACK"):
        msg += "\n" + traceback.format_exc()
    return msg[:2000]


def is_unavailable(exc: BaseException) -> bool:
    from bert_fast import BackendUnavailableError

    return isinstance(exc, (BackendUnavailableError, Unavailable, ImportError))


def build_provider(name: str, ctx: Context) -> Provider:
    """Set up provider ``name`` for ``ctx``; never raises (the failure is recorded in the Provider)."""
    t0 = time.perf_counter()
    spec = REGISTRY.get(name)
    try:
        if spec is None:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(REGISTRY)}")
        prov = spec.factory(ctx)
        prov.name = name
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        prov = Provider(name)
        if is_unavailable(exc):
            prov.unavailable = str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"
        else:
            prov.error = describe_error(exc)
    prov.setup_s = time.perf_counter() - t0
    return prov
