"""The padding ops ``unpad_mask``, ``gather_rows`` and ``scatter_rows`` against their ``_ref``s.

CPU tier: every mask dtype (NaN and non-0/1 values count as tokens), all-padding and all-token
rows, an empty batch, gather/scatter in every dtype with int32 and int64 indices, determinism,
opcheck, the C++ errors. gpu tier: the C++ CUDA ops at BERT batch shapes (``gpu_quick``).
Fuzzing at the end. There is no Triton kernel for these ops (PyTorch's indexing kernels serve the
GPU), so the backends are ``torch`` and ``cpp``. Outputs are NaN-poisoned throughout.
"""

from __future__ import annotations

import bert_fast.kernels as K
import pytest
import torch
from _check import bert_lengths, fuzz_settings, load_cpp_ops, skip_unless_cpp
from hypothesis import given
from hypothesis import strategies as st

OP = "gather_rows"
OP_BACKENDS = ("torch", "cpp")

pytestmark = pytest.mark.usefixtures("poison")


def _assert_unpad_equal(ours, ref, what=""):
    assert torch.equal(ours[0], ref[0]) and ours[0].dtype == torch.int64, f"{what}: indices"
    assert torch.equal(ours[1], ref[1]) and ours[1].dtype == torch.int32, f"{what}: cu_seqlens"
    assert ours[2] == ref[2] and type(ours[2]) is int, f"{what}: max_seqlen {ours[2]!r} != {ref[2]!r}"


@pytest.mark.parametrize("dtype", (torch.bool, torch.int64, torch.int32, torch.float32, torch.bfloat16))
def test_unpad_mask(backend, device, dtype):
    mask = (torch.rand(6, 37, device=device) > 0.3).to(dtype)
    mask[2] = 0  # a row that is all padding
    mask[4] = 1
    if dtype.is_floating_point:
        mask[0, :3] = torch.tensor([0.5, -2.0, float("nan")], dtype=dtype)  # nonzero (and NaN != 0) = token
    _assert_unpad_equal(K.unpad_mask(mask, backend=backend), K.unpad_mask_ref(mask), f"{backend} {dtype}")


def test_unpad_mask_empty_batch(backend, device):
    mask = torch.zeros(0, 5, dtype=torch.bool, device=device)
    ours, ref = K.unpad_mask(mask, backend=backend), K.unpad_mask_ref(mask)
    _assert_unpad_equal(ours, ref, backend)
    assert ours[2] == 0


def test_unpad_mask_rejects_1d(backend, device):
    with pytest.raises(ValueError, match=r"unpad_mask: expected a \(batch, seq_len\) mask"):
        K.unpad_mask(torch.ones(3, device=device), backend=backend)


@pytest.mark.backends("cpp")  # the torch backend is the oracle itself: the grid would compare it with itself
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.int64))
@pytest.mark.parametrize("hidden", (37, 768))
@pytest.mark.parametrize("index_dtype", (torch.int64, torch.int32))
def test_gather_scatter_rows(backend, device, dtype, hidden, index_dtype):
    mask = torch.rand(4, 33, device=device) > 0.4
    mask[1] = False
    indices = K.unpad_mask_ref(mask)[0].to(index_dtype)
    x = (torch.randn(mask.numel(), hidden, device=device) * 10).to(dtype)
    packed = K.gather_rows(x, indices, backend=backend)
    assert torch.equal(packed, K.gather_rows_ref(x, indices.long()))
    back = K.scatter_rows(packed, indices.long(), mask.numel(), backend=backend)
    assert torch.equal(back, K.scatter_rows_ref(packed, indices.long(), mask.numel()))
    assert (back[~mask.flatten()] == 0).all(), "padded rows must be zeros"


def test_scatter_rows_int32_indices(backend, device):
    """Every backend accepts the index dtypes of every other (gather_rows takes int32 on both)."""
    x, idx = torch.randn(3, 5, device=device), torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    assert torch.equal(K.scatter_rows(x, idx, 6, backend=backend), K.scatter_rows_ref(x, idx.long(), 6))


def test_strided_rows(backend, device):
    base = torch.randn(20, 50, device=device)
    x = base[:, 3:40]  # offset, row stride 50
    idx = torch.tensor([0, 4, 19, 7], device=device)
    assert torch.equal(K.gather_rows(x, idx, backend=backend), K.gather_rows_ref(x, idx))
    assert torch.equal(K.scatter_rows(x[:4], idx, 20, backend=backend), K.scatter_rows_ref(x[:4], idx, 20))


@pytest.mark.backends("torch", "cpp")  # determinism on CPU (the fuzz tests check every backend)
def test_identical_calls_are_bitwise_equal(backend, device):
    mask = torch.rand(5, 17, device=device) > 0.5
    a, b = K.unpad_mask(mask, backend=backend), K.unpad_mask(mask, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    x = torch.randn(85, 13, device=device)
    assert torch.equal(K.gather_rows(x, a[0], backend=backend), K.gather_rows(x, a[0], backend=backend))


@pytest.mark.parametrize("case", ("unpad_mask", "gather_rows", "scatter_rows"))
def test_opcheck(case):
    load_cpp_ops()
    ops = torch.ops.bert_fast
    x, idx = torch.randn(5, 37), torch.tensor([0, 1, 3])
    args = {
        "unpad_mask": (ops.unpad_mask.default, (torch.tensor([[1, 1, 0], [1, 0, 0]]),)),
        "gather_rows": (ops.gather_rows.default, (x, idx)),
        "scatter_rows": (ops.scatter_rows.default, (x[:3], idx, 6)),
    }
    op, a = args[case]
    torch.library.opcheck(op, a)


def test_cpp_errors():
    skip_unless_cpp()
    ops = torch.ops.bert_fast
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"gather_rows: index 9 is out of range \[0, 4\)"):
        ops.gather_rows(x, torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match=r"scatter_rows: index 5 is out of range \[0, 5\)"):
        ops.scatter_rows(x[:2], torch.tensor([0, 5]), 5)
    with pytest.raises(RuntimeError, match=r"unpad_mask: expected a \(batch, seq_len\) mask"):
        ops.unpad_mask(torch.ones(3))


# --- gpu tier: BERT batch shapes ----------------------------------------------------------------


@pytest.mark.backends("cpp")
@pytest.mark.parametrize(
    "dtype",
    [pytest.param(d, marks=[pytest.mark.gpu, pytest.mark.gpu_quick], id=str(d)[6:])
     for d in (torch.float32, torch.float16, torch.bfloat16)],
)
def test_bert_shapes(backend, device, dtype):
    lens = bert_lengths(32, 512)
    mask = torch.zeros(32, 512, dtype=torch.int64, device=device)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ours = K.unpad_mask(mask, backend=backend)
    _assert_unpad_equal(ours, K.unpad_mask_ref(mask), "bert mask")
    x = torch.randn(mask.numel(), 768, device=device).to(dtype)
    packed = K.gather_rows(x, ours[0], backend=backend)
    assert torch.equal(packed, K.gather_rows_ref(x, ours[0]))
    assert torch.equal(K.scatter_rows(packed, ours[0], mask.numel(), backend=backend),
                       K.scatter_rows_ref(packed, ours[0], mask.numel()))


# --- property-based fuzzing ---------------------------------------------------------------------


def test_fuzz(backend, device):
    """Random masks (all-padding and length-1 rows, left/right/random padding, any dtype),
    gather/scatter round trips on offset views, int32/int64 indices."""

    @fuzz_settings(backend, device)
    @given(
        lens=st.lists(st.integers(0, 13), min_size=1, max_size=6),
        extra=st.integers(0, 3),
        side=st.sampled_from(["right", "left", "random"]),
        mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.int32, torch.float32, torch.float16]),
        hidden=st.sampled_from([1, 3, 7, 37]),
        x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32]),
        index_int32=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def case(lens, extra, side, mask_dtype, hidden, x_dtype, index_int32, seed):
        torch.manual_seed(seed)  # tensors drawn from the example: a failure replays exactly
        seq = max(lens) + extra
        mask = torch.zeros(len(lens), seq, dtype=torch.bool, device=device)
        for i, n in enumerate(lens):
            if side == "right":
                mask[i, :n] = True
            elif side == "left":
                mask[i, seq - n :] = True
            else:
                mask[i, torch.randperm(seq, device=device)[:n]] = True
        mask = mask.to(mask_dtype)
        ours, ref = K.unpad_mask(mask, backend=backend), K.unpad_mask_ref(mask)
        _assert_unpad_equal(ours, ref, f"{backend} {side} {mask_dtype} lens={lens}")
        idx = ours[0].int() if index_int32 else ours[0]
        x = (torch.randn(mask.numel(), hidden + 2, device=device) * 5).to(x_dtype)[:, 1 : 1 + hidden]
        packed = K.gather_rows(x, idx, backend=backend)
        assert torch.equal(packed, K.gather_rows_ref(x, ours[0]))
        back = K.scatter_rows(packed, ours[0], mask.numel(), backend=backend)
        assert torch.equal(back, K.scatter_rows_ref(packed, ours[0], mask.numel()))

    case()
