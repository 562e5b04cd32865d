"""Our packed-weight fp32 SGEMM (``sgemm_pack`` / ``sgemm_packed_linear``, csrc/cpu/sgemm_avx2.cpp)
against ``F.linear``, and its routing in ``bert_fast.kernels.linear``.

CPU only (the op has no CUDA kernel). Row counts 1..17 cover every micro-kernel height (6 rows) and
its tails, 64 and 129 several blocks; N and K that are not multiples of the 16-column panel, and K
longer than the summation block (768), exercise the masked stores and the block sums added in the output.
Uninitialized memory is NaN-filled (``poison``), so an output element never written shows as NaN.
"""

from __future__ import annotations

import importlib

import bert_fast.kernels as K
import pytest
import torch
import torch.nn.functional as F
from _check import load_cpp_ops, skip_unless_cpp
from tolerances import assert_close_fp32

OP = "sgemm_packed_linear"

#: fp32 GEMMs add K products in another order than the reference (K up to 1600 here, values ~N(0, 1)
#: times weights ~0.1 N(0, 1)): a wider bound than the elementwise ops', as in test_linear.py.
FP32_GEMM_ATOL = 1e-4

ROWS = [*range(1, 18), 64, 129]

pytestmark = pytest.mark.usefixtures("poison")


@pytest.fixture
def ops():
    """``torch.ops.bert_fast`` with its kernels and fakes loaded; skips where our SGEMM cannot run."""
    load_cpp_ops()
    if not hasattr(torch.ops.bert_fast, "sgemm_available"):
        pytest.skip("the extension was built without sgemm_packed_linear")
    if not torch.ops.bert_fast.sgemm_available():
        pytest.skip("no AVX2 + FMA on this CPU")
    return torch.ops.bert_fast


def _threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    return prev


@pytest.mark.parametrize("n,k", [(37, 53), (16, 16), (48, 7), (1, 1600), (37, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(ops, n, k, with_bias):
    torch.manual_seed(n * 1000 + k)
    w, b = torch.randn(n, k) * 0.1, (torch.randn(n) if with_bias else None)
    packed = ops.sgemm_pack(w)
    for threads in (1, 2):
        prev = _threads(threads)
        try:
            for m in ROWS:
                x = torch.randn(m, k)
                ours = ops.sgemm_packed_linear(x, packed, n, k, b)
                assert ours.shape == (m, n) and ours.dtype == torch.float32
                assert_close_fp32(ours, F.linear(x, w, b), FP32_GEMM_ATOL, f"m={m} n={n} k={k} threads={threads}")
        finally:
            torch.set_num_threads(prev)


def test_two_threads_equal_one(ops):
    """The panels split over threads: each output is computed by one thread in the same order."""
    torch.manual_seed(0)
    w, b, x = torch.randn(300, 70) * 0.1, torch.randn(300), torch.randn(13, 70)
    packed = ops.sgemm_pack(w)
    prev = _threads(1)
    try:
        one = ops.sgemm_packed_linear(x, packed, 300, 70, b)
        torch.set_num_threads(2)
        two = ops.sgemm_packed_linear(x, packed, 300, 70, b)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


def test_pack_layout(ops):
    """Panel p holds columns 16p..16p+15 of W^T, one k after the other; the last panel zero-padded."""
    n, k = 37, 5
    w = torch.arange(n * k, dtype=torch.float32).view(n, k) + 1
    packed = ops.sgemm_pack(w)
    assert packed.shape == (3 * 16 * k,)
    panels = packed.view(3, k, 16)
    expected = torch.zeros(48, k)
    expected[:n] = w
    assert torch.equal(panels.permute(0, 2, 1).reshape(48, k), expected)
    # Weights given as views (transposed, sliced) pack as their values
    wt = w.t().contiguous().t()
    assert torch.equal(ops.sgemm_pack(wt), packed)


def test_strided_and_3d_x(ops):
    torch.manual_seed(1)
    n, k = 37, 53
    w, b = torch.randn(n, k) * 0.1, torch.randn(n)
    packed = ops.sgemm_pack(w)
    base = torch.randn(9, k + 11)
    for x, what in (
        (base[:, 3 : 3 + k], "row-strided view (read in place)"),
        (torch.randn(k, 9).t(), "transposed (column stride != 1)"),
        (base[::2, :k], "every other row"),
        (torch.randn(2, 5, k), "3-D"),
        (torch.randn(2, 5, k + 4)[..., 2 : 2 + k], "3-D strided"),
    ):
        ours = ops.sgemm_packed_linear(x, packed, n, k, b)
        assert ours.shape == (*x.shape[:-1], n), what
        assert_close_fp32(ours, F.linear(x, w, b), FP32_GEMM_ATOL, what)


def test_zero_rows(ops):
    w = torch.randn(20, 8)
    out = ops.sgemm_packed_linear(torch.randn(0, 8), ops.sgemm_pack(w), 20, 8, None)
    assert out.shape == (0, 20)


def test_errors(ops):
    w = torch.randn(20, 8)
    packed = ops.sgemm_pack(w)
    with pytest.raises(RuntimeError, match="x has 9 features in its last dim, the packed weight expects 8"):
        ops.sgemm_packed_linear(torch.randn(3, 9), packed, 20, 8, None)
    with pytest.raises(RuntimeError, match="packed must be a contiguous 1-D tensor of 384 floats"):
        ops.sgemm_packed_linear(torch.randn(3, 8), packed, 33, 8, None)
    with pytest.raises(RuntimeError, match="x is BFloat16, expected Float"):
        ops.sgemm_packed_linear(torch.randn(3, 8).bfloat16(), packed, 20, 8, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(20\)"):
        ops.sgemm_packed_linear(torch.randn(3, 8), packed, 20, 8, torch.randn(19))
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops.sgemm_pack(torch.randn(20))


def test_opcheck(ops):
    w = torch.randn(37, 53)
    torch.library.opcheck(ops.sgemm_pack.default, (w,))
    args = (torch.randn(5, 53), ops.sgemm_pack(w), 37, 53, torch.randn(37))
    torch.library.opcheck(ops.sgemm_packed_linear.default, args)


# --- routing in bert_fast.kernels.linear ----------------------------------------------------------


class _Recorder:
    """A ``packed`` argument of ``K.linear`` offering both packings, recording which were asked for."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.calls = w, []

    def __call__(self) -> torch.Tensor:
        self.calls.append("onednn")
        return K.prepack_weight(self.w)

    def sgemm(self) -> torch.Tensor:
        self.calls.append("sgemm")
        return importlib.import_module("bert_fast.kernels.linear").sgemm_pack_weight(self.w)


@pytest.fixture
def linear_mod():
    skip_unless_cpp()
    mod = importlib.import_module("bert_fast.kernels.linear")
    mod._sgemm_available.cache_clear()
    yield mod
    mod._sgemm_available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, "max", "max+1"])
def test_linear_routes_small_fp32_batches_to_sgemm(ops, linear_mod, dtype, rows):
    limit = linear_mod.SGEMM_MAX_ROWS
    rows = {"max": limit, "max+1": limit + 1}.get(rows, rows)
    if rows < 1:
        pytest.skip("SGEMM_MAX_ROWS is 0: the SGEMM is not routed to")
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 40), torch.randn(24, 40) * 0.1, torch.randn(24)
    rec = _Recorder(w.to(dtype))
    with torch.inference_mode():
        ours = K.linear(x.to(dtype), w.to(dtype), b.to(dtype), backend="cpp", packed=rec)
    takes_sgemm = dtype == torch.float32 and rows <= limit
    assert ("sgemm" in rec.calls) == takes_sgemm, rec.calls
    if takes_sgemm:
        assert rec.calls == ["sgemm"], rec.calls
        assert_close_fp32(ours, F.linear(x, w, b), FP32_GEMM_ATOL, f"routed rows={rows}")


@pytest.mark.parametrize("switch", ["monkeypatch", "env"])
def test_unsupported_isa_keeps_the_onednn_path(ops, linear_mod, monkeypatch, switch):
    """Without AVX2 + FMA (forced) the SGEMM packing is never asked for; oneDNN's prepacked path runs."""
    if switch == "env":
        monkeypatch.setenv("BERT_FAST_SGEMM", "0")
    else:
        monkeypatch.setattr(torch.ops.bert_fast, "sgemm_available", lambda: False)
    if linear_mod.SGEMM_MAX_ROWS < 1:
        pytest.skip("SGEMM_MAX_ROWS is 0: the SGEMM is not routed to")
    assert not linear_mod._sgemm_available()
    torch.manual_seed(2)
    x, w, b = torch.randn(4, 40), torch.randn(24, 40) * 0.1, torch.randn(24)
    rec = _Recorder(w)
    with torch.inference_mode():
        ours = K.linear(x, w, b, backend="cpp", packed=rec)
    assert "sgemm" not in rec.calls
    assert rec.calls == (["onednn"] if linear_mod._mkldnn_linear_available(torch.float32) else []), rec.calls
    assert_close_fp32(ours, F.linear(x, w, b), FP32_GEMM_ATOL, "forced unsupported")


def test_model_packer_caches_both_packings(ops):
    """``bert_fast._plan.packer``: each packing built once per weight version, rebuilt after an update."""
    from bert_fast import _plan

    lin = torch.nn.Linear(40, 24)
    with torch.no_grad():
        p = _plan.packer(lin, lin.weight)
        first = p.sgemm()
        assert p.sgemm() is first and _plan.packer(lin, lin.weight).sgemm() is first
        lin.weight.mul_(2)
        second = p.sgemm()
    assert second is not first
    assert torch.equal(second, ops.sgemm_pack(lin.weight.detach()))


@pytest.mark.parametrize("env", ["on", "off"])
def test_model_forward_uses_sgemm_and_matches_hf(ops, linear_mod, monkeypatch, env):
    """An fp32 model on the cpp backend, inference: every dense layer's GEMM packs for our SGEMM (and
    none for oneDNN), and the outputs match HF's; with ``BERT_FAST_SGEMM=0`` it is the other way round."""
    import transformers
    from _models import paired, random_batch, tiny_config
    from tolerances import FP32_MODEL_ATOL

    import bert_fast
    from bert_fast import _plan

    if env == "off":
        monkeypatch.setenv("BERT_FAST_SGEMM", "0")
    cfg = tiny_config(hidden_size=72, num_attention_heads=4, intermediate_size=150)  # N, K not multiples of 16
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend="cpp")
    ids, mask, types = random_batch([9, 3, 16, 1], cfg, seq_len=16)
    with torch.inference_mode():
        a = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    valid = mask.bool()
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, f"model, SGEMM {env}")
    keys = set()
    for module in ours.modules():
        keys |= set(_plan._tables.get(module, {}) or {})
    if env == "on":
        assert "sgemm_packed" in keys and "packed" not in keys, keys
    else:
        assert "sgemm_packed" not in keys, keys
