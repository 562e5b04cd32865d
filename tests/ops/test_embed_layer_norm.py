"""``embed_layer_norm`` on every backend against ``embed_layer_norm_ref``.

CPU tier: odd and BERT hidden sizes, with and without token types, ``inputs_embeds`` instead of
ids, int32 and int64 ids, eps 1e-12 and 1e-5, packed positions with an empty sequence, a constant
row at eps=1e-12, fp16 tables of |x| ~ 1e4, determinism, gradients (reference backward), opcheck,
the C++ range errors. gpu tier: BERT-base/large tables (vocab 30522) in fp32/fp16/bf16
(``gpu_quick``: BERT-base, ids + token types). Fuzzing at the end. Outputs are NaN-poisoned.
"""

from __future__ import annotations

import _check
import bert_fast.kernels as K
import pytest
import torch
from _check import (
    BERT_SHAPES,
    DTYPES,
    ROW_HIDDENS,
    bert_lengths,
    check_op,
    fp32_bound_for_layer_norm,
    fuzz_settings,
    load_cpp_ops,
    skip_unless_cpp,
    usable_dtypes,
)
from hypothesis import given
from hypothesis import strategies as st
from tolerances import FP32_OP_ATOL, assert_close_fp32

OP = "embed_layer_norm"

pytestmark = pytest.mark.usefixtures("poison")


def _run(backend, ids, pos, tt, tables, eps, embeds=None):
    return K.embed_layer_norm(ids, pos, tt, *tables, eps, inputs_embeds=embeds, backend=backend)


def _ref(ids, pos, tt, word, pemb, temb, w, b, eps, embeds):
    return K.embed_layer_norm_ref(ids, pos, tt, word, pemb, temb, w, b, eps, inputs_embeds=embeds)


def _tables(hidden, dtype, device, vocab=101, max_pos=64, types=2, scale=1.0):
    word, pemb, temb = ((torch.randn(n, hidden, device=device) * scale).to(dtype) for n in (vocab, max_pos, types))
    w = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype)
    return word, pemb, temb, w, b


def _packed_positions(lens, device, dtype=torch.int64):
    return torch.cat([torch.arange(n, device=device, dtype=dtype) for n in lens])


# --- CPU tier -----------------------------------------------------------------------------------

# (token types, inputs_embeds, eps, id dtype)
VARIANTS = [
    (True, False, 1e-12, torch.int64),
    (False, False, 1e-5, torch.int32),
    (True, True, 1e-5, torch.int32),
    (False, True, 1e-12, torch.int64),
]


@pytest.mark.backends("cpp", "triton")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", ROW_HIDDENS)
@pytest.mark.parametrize("with_types,use_embeds,eps,id_dtype", VARIANTS)
def test_matches_reference(backend, device, dtype, hidden, with_types, use_embeds, eps, id_dtype):
    tables = _tables(hidden, dtype, device)
    # packed tokens of sequences with an empty one: 37 for the C++ kernel (split over threads), 13 for
    # the reference and the interpreter (one program per token)
    lens = (1, 7, 0, 5, 24) if backend == "cpp" else (1, 7, 0, 5)
    n = sum(lens)
    ids = None if use_embeds else torch.randint(0, 101, (n,), device=device, dtype=id_dtype)
    pos = _packed_positions(lens, device, id_dtype)
    pos[-5:] = torch.randint(0, 64, (5,), device=device, dtype=id_dtype)  # arbitrary positions too
    tt = torch.randint(0, 2, (n,), device=device, dtype=id_dtype) if with_types else None
    embeds = torch.randn(n, hidden, device=device).to(dtype) if use_embeds else None
    ours = _run(backend, ids, pos, tt, tables, eps, embeds)
    assert ours.shape == (n, hidden) and ours.is_contiguous()
    check_op(ours, _ref, (ids, pos, tt, *tables, eps, embeds), atol=FP32_OP_ATOL,
             what=f"{backend} {dtype} H={hidden} types={with_types} embeds={use_embeds}")


def test_constant_row_tiny_eps(backend, device):
    word, pemb, temb, w, b = _tables(384, torch.float32, device)
    pemb[0] = 0.0
    temb[0] = 0.0
    word[5] = 0.25  # word 5 + type 0 + position 0 is a constant row: output = bias exactly
    word[6] = 3.7
    ids, pos = torch.tensor([5, 7, 6], device=device), torch.tensor([0, 3, 0], device=device)
    tables = (word, pemb, temb, w, b)
    out = _run(backend, ids, pos, None, tables, 1e-12)
    assert_close_fp32(out, _ref(ids, pos, None, *tables, 1e-12, None), FP32_OP_ATOL, f"{backend} constant row")
    assert torch.equal(out[0], b) and torch.equal(out[2], b), f"{backend}: a constant row is not exactly the bias"


def test_fp16_large_activations(backend, device):
    """fp16 tables of |x| ~ 1e4: the statistics must be fp32 (no overflow, no inf)."""
    tables = _tables(768, torch.float16, device, scale=1e4)
    ids, pos = torch.randint(0, 101, (9,), device=device), torch.arange(9, device=device)
    tt = torch.randint(0, 2, (9,), device=device)
    ours = _run(backend, ids, pos, tt, tables, 1e-12)
    assert torch.isfinite(ours).all(), f"{backend}: fp16 embeddings of |x| ~ 1e4 overflowed"
    check_op(ours, _ref, (ids, pos, tt, *tables, 1e-12, None), atol=FP32_OP_ATOL, what=f"{backend} fp16 |x|~1e4")


@pytest.mark.backends("torch", "cpp")  # determinism on CPU (the fuzz tests check every backend)
def test_identical_calls_are_bitwise_equal(backend, device):
    tables = _tables(312, torch.float32, device)
    ids, pos = torch.randint(0, 101, (37,), device=device), torch.randint(0, 64, (37,), device=device)
    tt = torch.randint(0, 2, (37,), device=device)
    first = _run(backend, ids, pos, tt, tables, 1e-12)
    assert torch.equal(first, _run(backend, ids, pos, tt, tables, 1e-12)), f"{backend}: two identical calls differ"


@pytest.mark.backends("cpp", "triton")
def test_gradients_equal_reference(backend, device):
    base = _tables(37, torch.float32, device, vocab=20, max_pos=16)
    ids, pos = torch.randint(0, 20, (6,), device=device), torch.arange(6, device=device)

    def run(be, *tables):
        return _run(be, ids, pos, None, tables, 1e-12)

    _check.assert_grads_match_torch(run, base, backend, FP32_OP_ATOL)


def _opcheck_args(kind):
    h = 37
    x = torch.randn(5, h)
    w, b = torch.randn(h), torch.randn(h)
    we, pe, te = torch.randn(20, h), torch.randn(16, h), torch.randn(2, h)
    ids, pos, tt = torch.randint(0, 20, (5,)), torch.arange(5), torch.randint(0, 2, (5,))
    if kind == "ids":
        return (ids, pos, tt, we, pe, te, w, b, 1e-12, None)
    return (None, pos, None, we, pe, te, w, b, 1e-12, x)


@pytest.mark.parametrize("kind", ("ids", "inputs_embeds"))
def test_opcheck(kind):
    load_cpp_ops()
    torch.library.opcheck(torch.ops.bert_fast.embed_layer_norm.default, _opcheck_args(kind))


def test_cpp_errors():
    skip_unless_cpp()
    op = torch.ops.bert_fast.embed_layer_norm
    w, b = torch.randn(8), torch.randn(8)
    we, pe, te = torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"input_ids value 10 is out of range \[0, 10\)"):
        op(torch.tensor([1, 10]), torch.tensor([0, 1]), None, we, pe, te, w, b, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"position_ids value -1 is out of range"):
        op(torch.tensor([1, 2]), torch.tensor([0, -1]), None, we, pe, te, w, b, 1e-5, None)


# --- gpu tier: BERT shapes ----------------------------------------------------------------------


@pytest.mark.backends("triton", "cpp")
@pytest.mark.parametrize("dtype,model,variant", _check.bert_cases(("ids+types", "inputs_embeds")))
def test_bert_shapes(backend, device, dtype, model, variant):
    hidden, _ = BERT_SHAPES[model]
    lens = bert_lengths(32, 512)
    n = sum(lens)
    word = (torch.randn(30522, hidden, device=device) * 0.05).to(dtype)
    pemb = (torch.randn(512, hidden, device=device) * 0.05).to(dtype)
    temb = (torch.randn(2, hidden, device=device) * 0.05).to(dtype)
    w = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    b = (torch.randn(hidden, device=device) * 0.1).to(dtype)
    tables = (word, pemb, temb, w, b)
    pos = _packed_positions(lens, device)
    if variant == "ids+types":
        ids, tt, embeds = torch.randint(0, 30522, (n,), device=device), torch.randint(0, 2, (n,), device=device), None
    else:
        ids, tt, embeds = None, None, torch.randn(n, hidden, device=device).to(dtype)
    ours = _run(backend, ids, pos, tt, tables, 1e-12, embeds)
    check_op(ours, _ref, (ids, pos, tt, *tables, 1e-12, embeds), atol=FP32_OP_ATOL,
             what=f"{backend} {model} {variant} {dtype}", oracle=torch.float64)


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random token counts (incl. 0 and 1), hidden sizes (1, odd primes), dtypes, id dtypes,
    optional token types / inputs_embeds, non-contiguous id and embedding views."""

    @fuzz_settings(backend, device)
    @given(
        lens=st.lists(st.integers(0, 9), min_size=1, max_size=4),
        hidden=st.sampled_from([1, 2, 3, 7, 13, 37, 127, 312]),
        dtype=st.sampled_from(usable_dtypes(backend, device)),
        id_dtype=st.sampled_from([torch.int32, torch.int64]),
        with_types=st.booleans(),
        use_embeds=st.booleans(),
        strided=st.booleans(),
        eps=st.sampled_from([1e-12, 1e-5]),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(lens, hidden, dtype, id_dtype, with_types, use_embeds, strided, eps, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        n = sum(lens)
        tables = _tables(hidden, dtype, device, vocab=23, max_pos=16, types=3)
        step = 2 if strided else 1  # every other element of a longer tensor: non-contiguous ids
        pos = torch.cat([torch.arange(x, device=device, dtype=id_dtype) for x in lens])
        pos = pos.repeat_interleave(step)[::step] if strided else pos
        ids = torch.randint(0, 23, (n * step,), device=device, dtype=id_dtype)[::step]
        tt = torch.randint(0, 3, (n * step,), device=device, dtype=id_dtype)[::step] if with_types else None
        embeds = None
        if use_embeds:
            ids = None
            embeds = torch.randn(n, hidden + 4 * step, device=device).to(dtype)[:, : hidden] if strided else (
                torch.randn(n, hidden, device=device).to(dtype))
        ours = _run(backend, ids, pos, tt, tables, eps, embeds)
        what = f"{backend} {dtype} lens={lens} H={hidden} types={with_types} embeds={use_embeds} strided={strided}"
        word, pemb, temb = (t.double() for t in tables[:3])
        h = (word[ids.long()] if ids is not None else embeds.double()) + pemb[pos.long()]
        h = h + (temb[tt.long()] if tt is not None else temb[0])
        atol = fp32_bound_for_layer_norm(h, FP32_OP_ATOL)
        check_op(ours, _ref, (ids, pos, tt, *tables, eps, embeds), atol=atol, what=what)
        assert torch.equal(ours, _run(backend, ids, pos, tt, tables, eps, embeds)), f"{what}: two calls differ"

    case()
