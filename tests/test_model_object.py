"""An optimized model stays an ordinary model object after its first forward.

Derived caches (fused QKV weights, oneDNN-prepacked weights, the plan) must never break copying,
saving or pickling, must follow every way weights change, and must be safe to build from several
threads at once. Each change is applied to the HF reference too and the outputs compared.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import transformers
from _models import backends_for_models, paired, random_batch, tiny_config
from tolerances import FP32_MODEL_ATOL, assert_close_fp32

import bert_fast

LENGTHS = [6, 2, 9, 4]


def _outputs(model, ids, mask):
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out.last_hidden_state[mask.bool()], out.pooler_output


def _check(ours, ref, ids, mask, what):
    a, pa = _outputs(ref, ids, mask)
    b, pb = _outputs(ours, ids, mask)
    assert_close_fp32(b, a, FP32_MODEL_ATOL, what)
    assert_close_fp32(pb, pa, FP32_MODEL_ATOL, what + " (pooler)")


@pytest.fixture
def models(request):
    cfg = tiny_config()
    ref, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    bert_fast.optimize(ours, backend=request.param)
    ids, mask, _ = random_batch(LENGTHS, cfg)
    _check(ours, ref, ids, mask, "first forward")  # builds every derived cache
    return ref, ours, ids, mask


BACKENDS = backends_for_models()


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_deepcopy_after_forward(models):
    ref, ours, ids, mask = models
    clone = copy.deepcopy(ours)
    assert bert_fast.is_optimized(clone)
    _check(clone, ref, ids, mask, "deepcopy")
    with torch.no_grad():  # the copy is independent: changing it leaves the original alone
        clone.encoder.layer[0].attention.self.value.weight.mul_(2)
    _check(ours, ref, ids, mask, "original after changing the copy")


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_torch_save_load_and_pickle_whole_model(models):
    ref, ours, ids, mask = models
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _check(loaded, ref, ids, mask, "torch.save/torch.load")
    unpickled = pickle.loads(pickle.dumps(ours))
    _check(unpickled, ref, ids, mask, "pickle")
    # the copies carry no derived cache (rebuilt on first use): nothing opaque is ever serialized
    for copied in (loaded, unpickled, copy.deepcopy(ours)):
        fresh = copy.deepcopy(copied)
        assert all(not m.__dict__.get("_bert_fast_derived") for m in fresh.modules())


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_save_pretrained_from_pretrained(models, tmp_path):
    ref, ours, ids, mask = models
    ours.save_pretrained(tmp_path)
    back = bert_fast.BertModel.from_pretrained(tmp_path).eval()
    _check(back, ref, ids, mask, "save_pretrained/from_pretrained")
    assert set(ours.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_dtype_round_trip(models):
    ref, ours, ids, mask = models
    for model in (ref, ours):
        model.to(torch.bfloat16)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).last_hidden_state.float()
        b = ours(ids, attention_mask=mask).last_hidden_state.float()
    valid = mask.bool()
    assert torch.isfinite(b[valid]).all() and (b[valid] - a[valid]).abs().max() < 0.25
    for model in (ref, ours):
        model.to(torch.float32)  # weights are now bf16-rounded: the caches must follow
    _check(ours, ref, ids, mask, "after bf16 and back")


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_load_state_dict_new_parameter_and_in_place_update(models):
    ref, ours, ids, mask = models
    other, _ = paired(transformers.BertModel, bert_fast.BertModel, tiny_config(initializer_range=0.05))
    for model in (ref, ours):
        model.load_state_dict(other.state_dict())
    _check(ours, ref, ids, mask, "load_state_dict")
    new_key = torch.randn_like(ref.encoder.layer[1].attention.self.key.weight) * 0.05
    new_dense = torch.randn_like(ref.encoder.layer[0].intermediate.dense.weight) * 0.05
    for model in (ref, ours):
        model.encoder.layer[1].attention.self.key.weight = torch.nn.Parameter(new_key.clone())
        model.encoder.layer[0].intermediate.dense.weight = torch.nn.Parameter(new_dense.clone())
    _check(ours, ref, ids, mask, "new Parameters")
    with torch.no_grad():
        for model in (ref, ours):
            model.encoder.layer[0].attention.self.query.bias.add_(0.3)
            model.encoder.layer[1].output.dense.weight.mul_(0.5)
    _check(ours, ref, ids, mask, "in-place updates")


@pytest.mark.parametrize("models", BACKENDS, indirect=True)
def test_train_eval_flips(models):
    ref, ours, ids, mask = models  # tiny_config has dropout 0: train mode is deterministic
    for model in (ref, ours):
        model.train()
    _check(ours, ref, ids, mask, "train mode")
    for model in (ref, ours):
        model.eval()
    _check(ours, ref, ids, mask, "eval again")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_one_model(backend):
    """N threads, one fresh model (caches built under the race), inference_mode: the serial results."""
    cfg = tiny_config()
    _, ours = paired(transformers.BertModel, bert_fast.BertModel, cfg)
    serial_model = copy.deepcopy(ours)
    bert_fast.optimize(ours, backend=backend)
    bert_fast.optimize(serial_model, backend=backend)
    batches = [random_batch([(3 * i) % 9 + 1, 5, (5 * i) % 7 + 1], cfg) for i in range(8)]
    with torch.inference_mode():
        serial = [serial_model(ids, attention_mask=mask).last_hidden_state for ids, mask, _ in batches]
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            barrier.wait()
            with torch.inference_mode():
                for rep in range(2):
                    for i, (ids, mask, _) in enumerate(batches):
                        j = (i + tid) % len(batches)
                        ids, mask, _ = batches[j]
                        results[(tid, rep * 100 + j)] = ours(ids, attention_mask=mask).last_hidden_state
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads * 2 * len(batches)
    for (_, key), out in results.items():
        assert torch.equal(out, serial[key % 100]), key
