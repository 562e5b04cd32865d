"""Backend precedence and errors (DESIGN.md §3)."""

from __future__ import annotations

import pytest
import torch
from bert_fast.kernels import _backend, bias_act, use_backend

import bert_fast

CPU = torch.device("cpu")


def test_precedence(monkeypatch):
    monkeypatch.delenv("BERT_FAST_BACKEND", raising=False)
    assert _backend.requested_backend() == "auto"
    monkeypatch.setenv("BERT_FAST_BACKEND", "torch")
    assert _backend.requested_backend() == "torch"
    with use_backend("cpp"):
        assert _backend.requested_backend() == "cpp"  # context beats the environment
        assert _backend.requested_backend("triton") == "triton"  # explicit beats the context
        with use_backend("torch"):
            assert _backend.requested_backend() == "torch"
        assert _backend.requested_backend() == "cpp"
    assert _backend.requested_backend() == "torch"


def test_unknown_backend_names_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        _backend.requested_backend("gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("fast"):
            pass
    monkeypatch.setenv("BERT_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        _backend.requested_backend()


def test_auto_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expected = "cpp" if _backend.cpp_usable(CPU) else "torch"
    assert _backend.resolve("bias_act", CPU) == expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backend.triton_importable():
        assert _backend.resolve("bias_act", CPU) == "triton"  # the interpreter, for tests
    # an op that reports it cannot serve the call falls back silently under auto
    assert _backend.resolve("bias_act", CPU, supports={"triton": "no", "cpp": "no"}) == "torch"


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    with pytest.raises(bert_fast.BackendUnavailableError, match="needs CUDA tensors"):
        bias_act(x, None, "relu", backend="triton")


def test_explicit_cpp_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_backend, "load_cpp_extension", lambda: None)
    x = torch.randn(4, 8)
    with pytest.raises(bert_fast.BackendUnavailableError, match="pip install --no-build-isolation"):
        bias_act(x, None, "relu", backend="cpp")
    assert _backend.resolve("bias_act", CPU, "auto", supports={"triton": "no"}) == "torch"


@pytest.mark.skipif(not _backend.cpp_usable(CPU), reason="bert_fast._C not built")
def test_explicit_unsupported_call_raises():
    with pytest.raises(bert_fast.BackendUnavailableError, match="cannot serve this call: too big"):
        _backend.resolve("op", CPU, "cpp", supports={"cpp": "too big"})
    assert _backend.resolve("op", CPU, "torch", supports={"cpp": "too big"}) == "torch"
