"""Per-forward plan and derived caches of an optimized model.

**Plan.** Which implementation runs each fused op depends on the device, the dtype, whether
autograd may record, train/eval (attention dropout) and the requested backend — not on the call.
:func:`plan_for` resolves every op once per such key (:class:`Plan`: one callable per op) and
caches it; the layer loop calls the plan's callables directly, with no backend resolution and no
argument validation per op (the model validated its inputs at the boundary). An explicitly
requested backend that cannot serve one of the model's ops raises
:class:`~bert_fast.BackendUnavailableError` while the plan is built — at :func:`bert_fast.optimize`
or construction for the model's device and dtype, or at the first forward after the model moved —
naming the op and the reason.

**Derived caches** (the fused QKV weight, oneDNN-prepacked weights, plans) live in one
:class:`_Derived` table per module that copies, pickles and saves as empty: ``copy.deepcopy``,
pickling, ``torch.save`` and ``state_dict`` never see what is in it (a oneDNN-prepacked weight
cannot be copied or pickled), and a copy builds its own on first use. Entries
are keyed by the identity and version of the tensors they derive from (a new Parameter, ``.to()``
or an in-place update rebuilds them). Building is serialized by one lock, so threads racing on
first use build an entry once; lookups take no lock.

**Under** ``torch.compile`` (``torch.compiler.is_compiling()``) the caches are bypassed: a derived
value is computed from its tensors inside the graph (the fused QKV weight is a ``torch.cat`` the
compiler folds or fuses), with no lock, no data-pointer key and no opaque prepacked weight, so
Dynamo traces the forward without a graph break. The plan is resolved outside the trace, once per
traced graph (:func:`plan_for`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from . import kernels as K
from .kernels import _backend
from .kernels.activation import OP as BIAS_ACT
from .kernels.attention import OP as ATTENTION
from .kernels.embeddings import OP as EMBED
from .kernels.layer_norm import OP as LAYER_NORM
from .kernels.linear import OP as LINEAR
from .kernels.linear import sgemm_pack_weight
from .kernels.padding import GATHER_ROWS, SCATTER_ROWS, UNPAD_MASK

_lock = threading.RLock()

#: Key of a module's derived caches in its ``__dict__``.
_KEY = "_bert_fast_derived"


class _Derived(dict):
    """One module's derived caches. Never copied, pickled or saved: ``copy.deepcopy``, pickling and
    ``torch.save`` of the module give an empty one (rebuilt on first use), and it is no Parameter or
    buffer, so ``state_dict`` never sees it. Looked up with one dict access per use."""

    __slots__ = ()

    def __deepcopy__(self, memo) -> _Derived:
        return _Derived()

    def __reduce__(self):
        return (_Derived, ())


class _TablesView:
    """``get`` / ``pop`` of a module's derived-cache table, by module."""

    @staticmethod
    def get(owner: torch.nn.Module, default=None):
        return owner.__dict__.get(_KEY, default)

    @staticmethod
    def pop(owner: torch.nn.Module, default=None):
        return owner.__dict__.pop(_KEY, default)


_tables = _TablesView()


def _table(owner: torch.nn.Module) -> dict[str, Any]:
    table = owner.__dict__.get(_KEY)
    if table is None:
        with _lock:
            table = owner.__dict__.get(_KEY)
            if table is None:
                table = owner.__dict__[_KEY] = _Derived()
    return table


_epoch = [0]


def _structure_changed(*args) -> None:
    _epoch[0] += 1


# Global registration hooks: any module anywhere (re)assigning a Parameter, buffer or submodule
# bumps the epoch, which invalidates the per-layer lookups cached by the forward. Cheap (one
# increment per registration), and only registrations, never forwards, run them.
for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_structure_changed)


def structure_epoch() -> int:
    """Counter of Parameter / buffer / submodule (re)assignments in this process."""
    return _epoch[0]


def clear(owner: torch.nn.Module) -> None:
    """Drop every derived cache of ``owner`` and its submodules."""
    with _lock:
        for module in owner.modules():
            module.__dict__.pop(_KEY, None)


def _version_key(tensors) -> tuple:
    """Storage address and in-place version of each tensor.

    No dtype or device: the cache entry keeps the tensors' storages alive (see :func:`derived`), so
    a tensor with another dtype or device always has another address. Inference tensors (made under
    ``torch.inference_mode``) carry no version counter; their storage address is the key then.
    """
    try:
        return tuple([(t.data_ptr(), t._version) for t in tensors])
    except RuntimeError:
        return tuple([(t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors])


def derived(owner: torch.nn.Module, name: str, tensors, build: Callable[[], Any]) -> Any:
    """``build()``, cached for ``owner`` until any of ``tensors`` changes (storage or in-place version).

    The entry keeps aliases of ``tensors`` alive: their storages cannot be freed and their addresses
    reused by a new tensor (``.to()`` there and back, a new Parameter) while the key names them.
    """
    if torch.compiler.is_compiling():
        # Traced: no cache (its lock and storage-address keys break the graph); the compiler sees
        # the derivation itself.
        return build()
    table = _table(owner)
    key = _version_key(tensors)
    cached = table.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    with _lock:
        cached = table.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build(), tuple(t.detach() for t in tensors))
            table[name] = cached
    return cached[1]


def fused_qkv_of(owner: torch.nn.Module, tensors: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_qkv` from the tensors ``(w_q, w_k, w_v, b_q, b_k, b_v)`` themselves."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat(tensors[:3]), torch.cat(tensors[3:])
    return derived(owner, "qkv", tensors, lambda: (torch.cat(tensors[:3]), torch.cat(tensors[3:])))


def fused_qkv(self_attn: torch.nn.Module, q=None, k=None, v=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3 H, H) QKV weight and (3 H,) bias of ``self_attn`` (its ``query``/``key``/``value``, or
    the given linears); concatenated afresh under autograd."""
    if q is None:
        q, k, v = self_attn.query, self_attn.key, self_attn.value
    return fused_qkv_of(self_attn, (q.weight, k.weight, v.weight, q.bias, k.bias, v.bias))


class _Packer:
    """``weight`` prepacked for oneDNN (``p()``) and packed for our SGEMM (``p.sgemm()``), each built on
    its first call and cached for ``owner`` (two derived entries; only the one the GEMM uses is built)."""

    __slots__ = ("owner", "weight")

    def __init__(self, owner: torch.nn.Module, weight: torch.Tensor) -> None:
        self.owner, self.weight = owner, weight

    def __call__(self) -> torch.Tensor:
        return derived(self.owner, "packed", (self.weight,), lambda: K.prepack_weight(self.weight))

    def sgemm(self) -> torch.Tensor:
        return derived(self.owner, "sgemm_packed", (self.weight,), lambda: sgemm_pack_weight(self.weight))


def packer(owner: torch.nn.Module, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable giving ``weight`` prepacked for oneDNN, built on its first call and cached for ``owner``;
    its ``sgemm()`` gives ``weight`` packed for our fp32 SGEMM (``bert_fast.kernels.linear``), likewise."""
    return _Packer(owner, weight)


#: The op of each slot of :class:`Plan`, (the order of :func:`_select`'s ``backends``).
_SLOT_OPS = {
    "embed": EMBED, "linear": LINEAR, "attention": ATTENTION, "layer_norm": LAYER_NORM, "bias_act": BIAS_ACT,
    "unpad_mask": UNPAD_MASK, "gather_rows": GATHER_ROWS, "scatter_rows": SCATTER_ROWS,
}  # fmt: skip


class Plan:
    """The callable of every fused op for one (device, dtype, grad, training, backend) key."""

    __slots__ = (
        "embed", "linear", "attention", "layer_norm", "bias_act", "unpad_mask", "gather_rows", "scatter_rows",
        "backends", "attention_dropout", "layer_norm_dropout",
    )  # fmt: skip

    def __repr__(self) -> str:
        return f"Plan({self.backends})"


def build_plan(model, device: torch.device, dtype: torch.dtype, grad: bool, training: bool, requested: str) -> Plan:
    """Resolve every op of ``model``'s forward once (raises for an explicit backend that cannot serve)."""
    from .families import family_of

    config = model.config
    fam = family_of(model)
    emb = model.embeddings
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    # Representative arguments: the model's own parameters and empty activations of the right
    # dtype, device, trailing shape and strides. The support checks read only those.
    x = torch.empty((0, hidden), device=device, dtype=dtype)
    inter = torch.empty((0, fam.intermediate_size(config)), device=device, dtype=dtype)
    ids = torch.empty((0,), device=device, dtype=torch.long)
    q, k, v = torch.empty((0, 3 * hidden), device=device, dtype=dtype).view(0, 3, heads, head_dim).unbind(1)
    layers = fam.layers(model)
    layer = fam.layer(layers[0], config) if len(layers) else None
    ln = layer.attn_ln if layer is not None else emb.LayerNorm
    dropout = fam.attn_dropout(config) if training else 0.0
    cu = torch.zeros((2,), device=device, dtype=torch.int32)
    mask = torch.empty((1, 0), device=device, dtype=torch.bool)
    w = layer.ffn_up.weight if layer is not None else torch.empty((0, hidden), device=device, dtype=dtype)
    args = {
        "embed": (ids, ids, ids, emb.word_embeddings.weight, emb.position_embeddings.weight, fam.type_table(emb),
                  emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps, None),
        "linear": (x, w, None, None),
        # a seed stands for the one each training forward draws (fused dropout takes one)
        "attention": (q, k, v, cu, config.max_position_embeddings, 1.0, dropout, 0 if dropout > 0 else None),
        "layer_norm": (x, ln.weight, ln.bias, ln.eps, ln.bias, x),
        "bias_act": (inter, None, "gelu"),
        "unpad_mask": (mask,),
        "gather_rows": (x, ids),
        "scatter_rows": (x, ids, 0),
    }  # fmt: skip
    return _select(tuple(op.resolve(device, requested, args[slot]) for slot, op in _SLOT_OPS.items()), device, grad)


def _select(backends: tuple[str, ...], device: torch.device, grad: bool) -> Plan:
    """The plan running each slot's op on the backend at the same place in ``backends``."""
    plan = Plan()
    for (slot, op), be in zip(_SLOT_OPS.items(), backends):
        setattr(plan, slot, op.select(be, device, grad))
    plan.backends = {op.name: be for op, be in zip(_SLOT_OPS.values(), backends)}
    # Whether the slot's backend fuses dropout (then the layer passes it a seed; else the reference
    # takes PyTorch's own dropout): the Triton kernels (also behind ``cpp`` attention on CUDA) and
    # the C++ kernels on the CPU (the extension's CUDA LayerNorm has no dropout).
    attention, layer_norm = plan.backends[ATTENTION.name], plan.backends[LAYER_NORM.name]
    plan.attention_dropout = attention in ("triton", "cpp")
    plan.layer_norm_dropout = layer_norm == "triton" or (layer_norm == "cpp" and device.type == "cpu")
    return plan


def requested_backend(model) -> str:
    """The backend ``model`` asks for: its own (``optimize(backend=)``), else the context / environment."""
    return _backend.requested_backend(model.__dict__.get("_bert_fast_backend"))


def plan_for(model, dtype: torch.dtype | None = None) -> Plan:
    """The cached plan of ``model`` for its current device, dtype, grad mode, train/eval and backend.

    Under ``torch.compile`` the plan is looked up (or built) once while the graph is traced, outside
    the trace (:func:`_backends_when_traced`): the graph holds only the calls of the plan's callables.
    """
    grad = torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        backends = _backends_when_traced(model, dtype, grad, model.training)
        return _select(backends, model.embeddings.word_embeddings.weight.device, grad)
    return _cached_plan(model, dtype, grad, model.training)


def _cached_plan(model, dtype: torch.dtype | None, grad: bool, training: bool) -> Plan:
    param = model.embeddings.word_embeddings.weight
    device = param.device
    dtype = param.dtype if dtype is None else dtype
    key = (device, dtype, grad, training, requested_backend(model))
    table = _table(model)
    plans = table.get("plans")
    plan = plans.get(key) if plans is not None else None
    if plan is None:
        plan = build_plan(model, device, dtype, grad, training, key[-1])
        with _lock:
            table.setdefault("plans", {})[key] = plan
    return plan


@torch.compiler.assume_constant_result
def _backends_when_traced(model, dtype: torch.dtype | None, grad: bool, training: bool) -> tuple[str, ...]:
    # Run as plain Python while Dynamo traces, its result (the backend names) a constant of the
    # graph: resolving a plan imports the extension, probes backends and takes the cache's lock,
    # none of which Dynamo can trace. Dynamo guards the module, its parameters (device, dtype), grad
    # mode and ``training``; the ``use_backend`` context / BERT_FAST_BACKEND in effect while tracing
    # is fixed for the graph.
    plan = _cached_plan(model, dtype, grad, training)
    return tuple(plan.backends[op.name] for op in _SLOT_OPS.values())
