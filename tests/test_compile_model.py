"""``torch.compile`` of an optimized model: no graph breaks for unpadded and for packed input.

Traced (``torch.compiler.is_compiling()``), the forward skips the checks that read device values,
computes the derived weights (fused QKV) in the graph instead of reading the caches, runs the
GEMMs as ``F.linear`` and resolves its plan outside the trace. Eager behaviour is unchanged.
Unpadded input: (B, L) ids, no mask. Packed input: HF's flattened layout with ``cu_seq_lens_q/k``
and ``max_length_q/k`` given.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers
from _models import _randomize, tiny_config
from bert_fast.kernels import _backend
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast
from bert_fast import _plan
from bert_fast._inputs import reads_values

CPP = pytest.mark.skipif(not _backend.cpp_usable(torch.device("cpu")), reason="bert_fast._C not built")
BACKENDS = [
    pytest.param("cpp", marks=CPP),
    pytest.param("torch"),
    pytest.param("auto"),  # cpp where built; the Triton interpreter where TRITON_INTERPRET=1 (conftest)
]
LAYOUTS = ["unpadded", "packed"]
LENGTHS = [5, 8]  # packed sequences of unequal lengths: the variable-length attention path


def _params():
    for backend in BACKENDS:
        for layout in LAYOUTS:
            yield pytest.param(backend.values[0], layout, marks=list(backend.marks), id=f"{backend.values[0]}-{layout}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _model(backend: str) -> transformers.BertModel:
    cfg = tiny_config()
    torch.manual_seed(1234)
    model = transformers.BertModel(cfg).eval()
    _randomize(model)
    return bert_fast.optimize(model, backend=backend)


def _inputs(layout: str, cfg) -> dict:
    if layout == "unpadded":
        return dict(
            input_ids=torch.randint(0, cfg.vocab_size, (2, 8)),
            token_type_ids=torch.randint(0, cfg.type_vocab_size, (2, 8)),
        )
    total = sum(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        input_ids=torch.randint(0, cfg.vocab_size, (1, total)),
        token_type_ids=torch.randint(0, cfg.type_vocab_size, (1, total)),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(LENGTHS),
        max_length_k=max(LENGTHS),
    )


def _assert_matches_eager(model, compiled, inputs: dict, what: str) -> None:
    with torch.no_grad():
        got = compiled(**inputs)
        want = model(**inputs)
    assert_close_fp32(got.last_hidden_state, want.last_hidden_state, FP32_MODEL_ATOL, f"{what} last_hidden_state")
    assert_close_fp32(got.pooler_output, want.pooler_output, FP32_MODEL_ATOL, f"{what} pooler_output")


@pytest.mark.parametrize("backend, layout", list(_params()))
def test_explain_shows_no_graph_break(backend, layout):
    model = _model(backend)
    inputs = _inputs(layout, model.config)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend, layout", list(_params()))
def test_fullgraph_aot_eager_matches_eager(backend, layout):
    model = _model(backend)
    inputs = _inputs(layout, model.config)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_matches_eager(model, compiled, inputs, f"{backend} {layout}")
    if layout == "packed":  # a second batch of the same shape with other offsets: the same graph
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = torch.tensor([0, 8, 13], dtype=torch.int32)
        _assert_matches_eager(model, compiled, inputs, f"{backend} {layout}, other offsets")


@functools.cache
def _inductor_unusable() -> str | None:
    """Why Inductor cannot compile on this machine (no working C++ toolchain), or ``None``."""
    try:
        x = torch.arange(8.0)
        out = torch.compile(lambda t: t * 2 + 1, backend="inductor", fullgraph=True)(x)
    except Exception as exc:  # the C++ compiler missing or broken: InductorError / CppCompileError
        return f"Inductor cannot compile here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None if torch.equal(out, x * 2 + 1) else "Inductor's trial kernel returned a wrong result"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fullgraph_inductor_matches_eager(layout):
    why = _inductor_unusable()
    if why is not None:
        pytest.skip(why)
    model = _model("cpp" if _backend.cpp_usable(torch.device("cpu")) else "torch")
    compiled = torch.compile(model, fullgraph=True)
    _assert_matches_eager(model, compiled, _inputs(layout, model.config), f"inductor {layout}")


def test_traced_forward_bypasses_the_derived_caches():
    model = _model("auto")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(**_inputs("unpadded", model.config))
    attn = model.encoder.layer[0].attention.self
    assert "qkv" not in (_plan._tables.get(attn) or {})  # computed in the graph, never cached
    with torch.no_grad():
        model(**_inputs("unpadded", model.config))
    assert "qkv" in _plan._tables.get(attn)  # eager still caches it


def test_value_checks_run_in_eager_only():
    assert reads_values() and not reads_values(False)
    traced = torch.compile(lambda x: x + int(reads_values()), fullgraph=True, backend="eager")
    assert torch.equal(traced(torch.zeros(2)), torch.zeros(2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_still_validates_after_compiling(layout):
    model = _model("auto")
    cfg = model.config
    inputs = _inputs(layout, cfg)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(**inputs)
        bad_ids = dict(inputs, input_ids=inputs["input_ids"].clone().fill_(cfg.vocab_size))
        with pytest.raises(ValueError, match=rf"input_ids contains {cfg.vocab_size}, outside \[0, {cfg.vocab_size}\)"):
            model(**bad_ids)
        if layout == "packed":
            bad_cu = torch.tensor([0, 5, 12], dtype=torch.int32)
            with pytest.raises(ValueError, match="cu_seq_lens_q must start at 0, never decrease and end at"):
                model(**dict(inputs, cu_seq_lens_q=bad_cu, cu_seq_lens_k=bad_cu))
            with pytest.raises(ValueError, match="max_length_q=7 but the longest sequence"):
                model(**dict(inputs, max_length_q=7, max_length_k=7))
        else:
            with pytest.raises(ValueError, match="attention_mask must hold only 0 .padding. and 1 .token.; found 2"):
                model(**inputs, attention_mask=torch.full((2, 8), 2))
