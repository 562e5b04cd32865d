"""The per-forward plan: ops resolved once per (device, dtype, grad, train/eval, backend), explicit
backends checked once at optimize() / construction, lazy support checks, device guards."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _models import paired, random_batch, tiny_config
from bert_fast.kernels import _backend, _dispatch
from bert_fast.kernels import _triton_utils as _tu
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast
from bert_fast import _plan

CPU = torch.device("cpu")


def _count_resolves(monkeypatch) -> list:
    calls = []
    real = _backend.resolve

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(_backend, "resolve", counting)
    return calls


@pytest.mark.parametrize("backend", [None, "torch"])
def test_ops_resolved_once_per_plan_not_per_call(monkeypatch, backend):
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend=backend)
    ids, mask, _ = random_batch([5, 2, 7], cfg)
    calls = _count_resolves(monkeypatch)
    with torch.no_grad():
        first = ours(ids, attention_mask=mask).last_hidden_state
        n_first = len(calls)
        second = ours(ids, attention_mask=mask).last_hidden_state
    assert n_first == len(_plan._SLOT_OPS)  # one resolution per op, in the plan build
    assert len(calls) == n_first  # the second forward resolves nothing
    assert torch.equal(first, second)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_close_fp32(first[valid], expected[valid], FP32_MODEL_ATOL, "planned forward")


def test_plan_keyed_by_grad_mode_training_and_dtype():
    cfg = tiny_config()
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    with torch.no_grad():
        p_eval = _plan.plan_for(ours)
        assert _plan.plan_for(ours) is p_eval
    p_grad = _plan.plan_for(ours)
    assert p_grad is not p_eval
    ours.train()
    assert _plan.plan_for(ours) is not p_grad
    ours.eval()
    ours.to(torch.bfloat16)
    with torch.no_grad():
        assert _plan.plan_for(ours) is not p_eval
    with bert_fast.use_backend("torch"), torch.no_grad():
        p_torch = _plan.plan_for(ours)
    assert set(p_torch.backends.values()) == {"torch"}


def test_explicit_triton_unusable_raises_at_optimize(monkeypatch):
    monkeypatch.setattr(_backend, "triton_usable", lambda device: False)
    model = transformers.BertModel(tiny_config())
    with pytest.raises(bert_fast.BackendUnavailableError, match=r"embed_layer_norm: backend 'triton' needs CUDA"):
        bert_fast.optimize(model, backend="triton")
    assert not bert_fast.is_optimized(model)  # nothing changed
    with pytest.raises(bert_fast.BackendUnavailableError, match="needs CUDA"):
        bert_fast.BertModel(tiny_config(), backend="triton")
    with pytest.raises(bert_fast.BackendUnavailableError, match="needs CUDA"):
        bert_fast.BertForSequenceClassification(tiny_config(), backend="triton")


def test_explicit_cpp_without_extension_raises_at_construction(monkeypatch):
    monkeypatch.setattr(_backend, "load_cpp_extension", lambda: None)
    with pytest.raises(bert_fast.BackendUnavailableError, match="embed_layer_norm: backend 'cpp'.*pip install"):
        bert_fast.BertModel(tiny_config(), backend="cpp")


@pytest.mark.skipif(not _backend.triton_usable(CPU), reason="needs the Triton interpreter")
def test_op_that_cannot_serve_the_model_is_named_at_optimize_and_after_a_move():
    model = copy.deepcopy(transformers.BertModel(tiny_config())).double()
    with pytest.raises(bert_fast.BackendUnavailableError, match=r"embed_layer_norm: backend 'triton' cannot .*float64"):
        bert_fast.optimize(model, backend="triton")
    model = bert_fast.optimize(transformers.BertModel(tiny_config()).eval(), backend="triton")
    model.double()  # moved after optimize(): the first forward's plan build raises, before any kernel
    ids, mask, _ = random_batch([3, 2], model.config)
    with pytest.raises(bert_fast.BackendUnavailableError, match="float64"), torch.no_grad():
        model(ids, attention_mask=mask)


def test_auto_never_raises_and_falls_back_per_op(monkeypatch):
    model = bert_fast.optimize(transformers.BertModel(tiny_config()).double().eval())
    ids, mask, _ = random_batch([3, 2], model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        plan = _plan.plan_for(model)
    if _backend.triton_usable(CPU):
        assert plan.backends["varlen_attention"] != "triton"  # float64 is not a Triton dtype


def test_support_checks_are_lazy():
    called = []

    def triton_support(x):
        called.append("triton")
        return "never"

    op = _dispatch.Op(
        "probe",
        lambda x: x + 1,
        {"triton": lambda x: x + 2, "cpp": lambda x: x + 3},
        supports={"triton": triton_support},
    )
    x = torch.zeros(2)
    assert op.resolve(CPU, "torch", (x,)) == "torch"
    if _backend.cpp_usable(CPU):
        assert op.resolve(CPU, "cpp", (x,)) == "cpp"
    assert called == []  # triton was never a candidate, its reason never computed
    if _backend.triton_usable(CPU):
        with pytest.raises(bert_fast.BackendUnavailableError, match="probe: backend 'triton' cannot serve"):
            op.resolve(CPU, "triton", (x,))
        assert called == ["triton"]


def test_explicit_backend_runs_its_declared_implementation():
    """linear and the padding ops under ``triton`` run the reference, as declared, never by accident."""
    import importlib

    from bert_fast.kernels import padding

    linear_mod = importlib.import_module("bert_fast.kernels.linear")  # the package's `linear` is the function

    assert linear_mod.OP.impl("triton", CPU) is linear_mod.OP.ref
    assert padding.GATHER_ROWS.impl("triton", CPU) is padding.gather_rows_ref
    if _backend.cpp_usable(CPU):
        assert linear_mod.OP.impl("cpp", CPU) is linear_mod._linear_cpu


# ---- device guard around every Triton launch ------------------------------------------------------


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the device current at each launch."""

    def __init__(self, state: dict, name: str) -> None:
        self.state, self.name = state, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.state["launches"].append((self.name, self.state["current"]))

        return launch


def test_every_triton_launch_runs_under_its_tensors_device(monkeypatch):
    import contextlib

    from bert_fast.kernels import activation, attention, embeddings, layer_norm

    state = {"current": None, "launches": []}

    @contextlib.contextmanager
    def guard(device):
        prev, state["current"] = state["current"], device
        try:
            yield
        finally:
            state["current"] = prev

    monkeypatch.setattr(_tu, "device_guard", guard)
    monkeypatch.setattr(_tu, "INTERPRETING", True)  # the fixed-config path: the kernel global is launched as is
    for mod, name in (
        (activation, "_bias_act_fwd_kernel"),
        (layer_norm, "_bias_residual_layer_norm_fwd_kernel"),
        (embeddings, "_embed_layer_norm_fwd_kernel"),
        (attention, "_varlen_attention_fwd_kernel"),
    ):
        monkeypatch.setattr(mod, name, _Recorder(state, name))
    x = torch.randn(6, 64)
    w = torch.randn(64)
    activation.bias_act_fwd(x, w, "gelu")
    layer_norm.bias_residual_layer_norm_fwd(x, w, w, 1e-12, w, x)
    table = torch.randn(10, 64)
    ids = torch.tensor([1, 2, 3])
    embeddings.embed_layer_norm_fwd(ids, ids, None, table, table, table, w, w, 1e-12)
    q = torch.randn(6, 2, 32)
    attention.varlen_attention_fwd(q, q, q, torch.tensor([0, 2, 6], dtype=torch.int32), 4, 0.1)
    launched = {name for name, _ in state["launches"]}
    assert launched == {
        "_bias_act_fwd_kernel",
        "_bias_residual_layer_norm_fwd_kernel",
        "_embed_layer_norm_fwd_kernel",
        "_varlen_attention_fwd_kernel",
    }
    assert all(device == CPU for _, device in state["launches"]), state["launches"]


def test_device_guard_is_free_when_not_needed():
    assert _tu.device_guard(CPU) is _tu.device_guard(torch.device("cpu"))  # one shared no-op context


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_on_second_gpu_while_first_is_current():
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ref, ours = ref.to("cuda:1"), bert_fast.optimize(ours.to("cuda:1"), backend="triton")
    ids, mask, _ = random_batch([5, 3], cfg)
    ids, mask = ids.to("cuda:1"), mask.to("cuda:1")
    torch.cuda.set_device(0)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).last_hidden_state
        b = ours(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, "model on cuda:1")
