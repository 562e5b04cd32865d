"""The whole model through the Triton backend (interpreter on CPU, real kernels on CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _models import paired, random_batch, tiny_config
from bert_fast.kernels import _backend
from tolerances import FP32_MODEL_ATOL, HALF_MODEL_FACTOR, assert_close_fp32, assert_half_rule

import bert_fast

pytestmark = pytest.mark.skipif(
    not _backend.triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton is not usable here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)


@pytest.mark.parametrize("hidden,heads,act", [(64, 2, "gelu"), (52, 2, "gelu_new")])  # head_dim 32, 26
def test_tiny_model_triton_matches_hf(hidden, heads, act):
    cfg = tiny_config(hidden_size=hidden, num_attention_heads=heads, intermediate_size=80, hidden_act=act,
                      num_hidden_layers=2)
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend="triton")
    ids, mask, types = random_batch([7, 1, 0, 5], cfg, seq_len=8)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    assert_close_fp32(b.last_hidden_state[valid], a.last_hidden_state[valid], FP32_MODEL_ATOL, "triton model")
    assert (b.last_hidden_state[~valid] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["base", "large"])
def test_bert_gpu_half_precision_rule(dtype, preset):
    """BERT-base/large, random weights: ours in half precision vs HF fp32 (3x HF-same-dtype error)."""
    size = {"base": dict(), "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=4096)}[preset]
    cfg = transformers.BertConfig(**size)
    torch.manual_seed(0)
    ref32 = transformers.BertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").cuda().eval()
    ref_half = copy.deepcopy(ref32).to(dtype)
    ours = bert_fast.optimize(copy.deepcopy(ref32).to(dtype), backend="triton")
    lens = [512, 17, 1, 300, 128, 0, 64, 255]
    ids = torch.randint(0, cfg.vocab_size, (len(lens), 512), device="cuda")
    mask = (torch.arange(512, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]).long()
    with torch.no_grad():
        r32 = ref32(ids, attention_mask=mask).last_hidden_state
        rh = ref_half(ids, attention_mask=mask).last_hidden_state
        oh = ours(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert_half_rule(oh[valid], rh[valid], r32[valid], HALF_MODEL_FACTOR, f"{preset} {dtype}")


@pytest.mark.gpu
def test_bert_gpu_fp32_ieee_parity():
    cfg = transformers.BertConfig()
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    ref, ours = ref.cuda(), bert_fast.optimize(ours.cuda(), backend="triton")
    ids, mask, types = random_batch([128, 7, 1, 0, 77], cfg)
    ids, mask, types = ids.cuda(), mask.cuda(), types.cuda()
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    valid = mask.bool()
    assert_close_fp32(b[valid], a[valid], FP32_MODEL_ATOL, "BERT-base fp32 on GPU")
