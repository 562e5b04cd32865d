"""Training features of the drop-in classes: activation checkpointing honoured, gradients equal to HF's."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

import bert_fast
from tests._check import cpp_has_kernel
from tests._models import backends_for_models, paired, random_batch, tiny_config
from tests.tolerances import FP32_MODEL_ATOL


def _pair(hf_cls, ours_cls, config, backend):
    """An HF eager model and ours (``backend``) with the same weights, both in training mode."""
    ref, _ = paired(hf_cls, hf_cls, config)
    ours = ours_cls(copy.deepcopy(config), backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.train(), ours.train()


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (and its result)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ref, ours) -> None:
    """Every parameter gradient of ``ours`` equal to ``ref``'s (fp32 model tolerance)."""
    g_ref, g_ours = _grads(ref), _grads(ours)
    assert g_ref.keys() == g_ours.keys()
    for name in g_ref:
        err = (g_ref[name] - g_ours[name]).abs().max().item()
        assert err <= FP32_MODEL_ATOL, f"{name}: max abs diff {err:.3e}"


def _mlm_step(model, ids, mask, types, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    out.loss.backward()
    return out.loss.detach()


@pytest.mark.parametrize("backend", backends_for_models())
def test_gradient_checkpointing_saves_memory_and_keeps_gradients(backend):
    config = tiny_config(num_hidden_layers=3)
    ref, ours = _pair(transformers.BertForMaskedLM, bert_fast.BertForMaskedLM, config, backend)
    torch.manual_seed(0)
    ids, mask, types = random_batch([17, 9, 33, 1], config)
    # labels on valid tokens only: padded positions are ours to define (zeros), HF's are not
    labels = torch.where((torch.rand(ids.shape) < 0.3) & (mask == 1), ids, torch.full_like(ids, -100))

    plain_bytes, _ = _saved_bytes(lambda: ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits)
    ours.gradient_checkpointing_enable()
    ref.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in ours.bert.encoder.layer)
    ckpt_bytes, _ = _saved_bytes(lambda: ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits)
    # Per layer only the input is kept: much less than the ~10 activations a layer saves otherwise.
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)

    loss_ref = _mlm_step(ref, ids, mask, types, labels)
    loss_ours = _mlm_step(ours, ids, mask, types, labels)
    assert abs(loss_ref.item() - loss_ours.item()) <= FP32_MODEL_ATOL
    _assert_same_grads(ref, ours)


@pytest.mark.parametrize("backend", backends_for_models())
def test_gradient_checkpointing_repeats_dropout_masks(backend):
    """With dropout on, the recomputation must draw the same masks: same gradients as without checkpointing."""
    # the cpp backend fuses both dropouts (seeded masks); the torch backend runs PyTorch's own
    config = tiny_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    _, ours = _pair(transformers.BertForMaskedLM, bert_fast.BertForMaskedLM, config, backend)
    ids, mask, types = random_batch([12, 20, 5], config)
    labels = torch.where((torch.rand(ids.shape) < 0.5) & (mask == 1), ids, torch.full_like(ids, -100))

    torch.manual_seed(7)
    loss_plain = _mlm_step(ours, ids, mask, types, labels)
    g_plain = _grads(ours)
    ours.gradient_checkpointing_enable()
    torch.manual_seed(7)
    loss_ckpt = _mlm_step(ours, ids, mask, types, labels)
    g_ckpt = _grads(ours)
    assert loss_plain.item() == pytest.approx(loss_ckpt.item(), abs=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=0, msg=name)
    ours.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in ours.bert.encoder.layer)


def test_cpp_training_runs_fused_backward_kernels(monkeypatch):
    """A tiny BertModel on the cpp backend in training: gradients equal to HF's, and the embeddings
    and attention gradients come from their C++ backward kernels (each called once per backward)."""
    names = ("embed_layer_norm_bwd", "varlen_attention_bwd", "bias_residual_layer_norm_bwd")
    if not all(cpp_has_kernel(n, "cpu") for n in names):
        pytest.skip("bert_fast._C is not built, or predates the backward kernels")
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(torch.ops.bert_fast, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(torch.ops.bert_fast, name, counted)
    config = tiny_config(num_hidden_layers=2)
    ref, ours = _pair(transformers.BertModel, bert_fast.BertModel, config, "cpp")
    torch.manual_seed(5)
    ids, mask, types = random_batch([17, 9, 1, 0, 12], config)
    weights = torch.randn(*ids.shape, config.hidden_size) * mask[..., None]  # valid tokens only
    for model in (ref, ours):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        (out * weights).sum().backward()
    assert calls["embed_layer_norm_bwd"] == 1, calls
    assert calls["varlen_attention_bwd"] == config.num_hidden_layers, calls
    assert calls["bias_residual_layer_norm_bwd"] == 2 * config.num_hidden_layers, calls
    _assert_same_grads(ref, ours)


def test_cpp_training_fuses_dropout(monkeypatch):
    """With BERT's dropout on, the cpp backend runs attention and residual dropout inside its kernels
    (seeded; the backward kernels get the forward's seed), once per layer and op, and a step repeats
    exactly under the same ``torch.manual_seed``."""
    names = ("varlen_attention_dropout", "bias_residual_layer_norm_dropout", "varlen_attention_bwd",
             "bias_residual_layer_norm_bwd")  # fmt: skip
    if not all(cpp_has_kernel(n, "cpu") for n in names):
        pytest.skip("bert_fast._C is not built, or predates the fused dropout kernels")
    seeds: dict[str, list] = {n: [] for n in names}
    for name in names:
        real = getattr(torch.ops.bert_fast, name)

        def recorded(*args, _real=real, _name=name):
            seeds[_name].append((args[-2], args[-1]))  # (dropout_p, seed)
            return _real(*args)

        monkeypatch.setattr(torch.ops.bert_fast, name, recorded)
    config = tiny_config(num_hidden_layers=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
    _, ours = _pair(transformers.BertModel, bert_fast.BertModel, config, "cpp")
    ids, mask, types = random_batch([17, 9, 1, 12], config)
    weights = torch.randn(*ids.shape, config.hidden_size) * mask[..., None]

    def step():
        ours.zero_grad(set_to_none=True)
        out = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        (out * weights).sum().backward()
        return out.detach(), _grads(ours)

    torch.manual_seed(3)
    out1, g1 = step()
    layers = config.num_hidden_layers
    assert [p for p, _ in seeds["varlen_attention_dropout"]] == pytest.approx([0.2] * layers)
    assert [p for p, _ in seeds["bias_residual_layer_norm_dropout"]] == pytest.approx([0.1] * 2 * layers)
    # the backward regenerates each forward's mask: same seeds, in reverse order
    fwd_attn = [s for _, s in seeds["varlen_attention_dropout"]]
    assert sorted(s for _, s in seeds["varlen_attention_bwd"]) == sorted(fwd_attn)
    fwd_ln = [s for _, s in seeds["bias_residual_layer_norm_dropout"]]
    assert sorted(s for _, s in seeds["bias_residual_layer_norm_bwd"]) == sorted(fwd_ln)
    assert len(set(fwd_attn + fwd_ln)) == 3 * layers  # a fresh seed per call
    torch.manual_seed(3)
    out2, g2 = step()
    assert torch.equal(out1, out2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    out3, _ = step()  # the generator moved on: other masks
    assert not torch.equal(out1, out3)


@pytest.mark.parametrize("backend", backends_for_models())
def test_padding_row_of_the_word_table_gets_no_gradient(backend):
    """HF's word table is ``nn.Embedding(padding_idx=pad_token_id)``: a padding id among the real
    tokens gets no gradient there. Ours (fused embedding backward) matches it on every parameter."""
    config = tiny_config(num_hidden_layers=1)
    ref, ours = _pair(transformers.BertModel, bert_fast.BertModel, config, backend)
    torch.manual_seed(7)
    ids, mask, types = random_batch([9, 5], config)
    pad = config.pad_token_id
    ids[0, 2] = ids[1, 1] = pad  # padding ids at valid (mask = 1) positions
    weights = torch.randn(*ids.shape, config.hidden_size) * mask[..., None]
    for model in (ref, ours):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        (out * weights).sum().backward()
    word = ours.embeddings.word_embeddings.weight.grad
    assert word[pad].abs().max() == 0 and word.abs().sum() > 0
    _assert_same_grads(ref, ours)  # HF's padding row has no gradient either


# ---- sparse MLM prediction ---------------------------------------------------------------------


def test_linear_cross_entropy_matches_dense(monkeypatch):
    from bert_fast import _sparse_mlm
    from bert_fast._sparse_mlm import linear_cross_entropy

    torch.manual_seed(3)
    n, hidden, vocab = 37, 24, 101
    monkeypatch.setattr(_sparse_mlm, "CHUNK_ELEMENTS", 8 * vocab)  # 8-row chunks: 5 chunks, a partial last one
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    loss, logits = linear_cross_entropy(h, w, b, t)
    ref_logits = torch.nn.functional.linear(h, w, b)
    ref = torch.nn.functional.cross_entropy(ref_logits, t)
    torch.testing.assert_close(logits, ref_logits.detach(), atol=1e-5, rtol=0)
    assert not logits.requires_grad
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    got = torch.autograd.grad(loss * 3.0, (h, w, b))
    want = torch.autograd.grad(ref * 3.0, (h, w, b))
    for name, g, r in zip(("h", "weight", "bias"), got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("task", ["mlm", "pretraining"])
@pytest.mark.parametrize("backend", backends_for_models())
def test_sparse_prediction_matches_hf(task, backend):
    config = tiny_config(num_hidden_layers=2, vocab_size=211)
    hf_cls, ours_cls = {
        "mlm": (transformers.BertForMaskedLM, bert_fast.BertForMaskedLM),
        "pretraining": (transformers.BertForPreTraining, bert_fast.BertForPreTraining),
    }[task]
    ref, _ = paired(hf_cls, hf_cls, config)
    ours = ours_cls(copy.deepcopy(config), backend=backend, sparse_prediction=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train()
    ours.train()
    torch.manual_seed(11)
    ids, mask, types = random_batch([21, 7, 30, 2], config)
    sel = (torch.rand(ids.shape) < 0.2) & (mask == 1)
    sel[0, 0] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    extra = {"next_sentence_label": torch.tensor([0, 1, 1, 0])} if task == "pretraining" else {}

    outs = []
    for model in (ref, ours):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, **extra)
        out.loss.backward()
        outs.append(out)
    out_ref, out_ours = outs
    assert abs(out_ref.loss.item() - out_ours.loss.item()) <= FP32_MODEL_ATOL
    dense = out_ref.logits if task == "mlm" else out_ref.prediction_logits
    sparse = out_ours.logits if task == "mlm" else out_ours.prediction_logits
    assert sparse.shape == (int(sel.sum()), config.vocab_size)
    torch.testing.assert_close(sparse, dense[sel].detach(), atol=FP32_MODEL_ATOL, rtol=0)
    _assert_same_grads(ref, ours)
    # without labels the head is dense, as HF's
    with torch.no_grad():
        dense_ours = ours.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (dense_ours.logits if task == "mlm" else dense_ours.prediction_logits).shape == dense.shape


def test_optimize_sparse_prediction_and_revert():
    config = tiny_config()
    model = transformers.BertForMaskedLM(copy.deepcopy(config))
    bert_fast.optimize(model, sparse_prediction=True)
    ids, mask, _ = random_batch([5, 9], config)
    labels = torch.full_like(ids, -100)
    labels[1, 3] = 4
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (1, config.vocab_size)
    # the signature HF Trainer inspects to keep batch columns is transformers'
    assert "input_ids" in inspect.signature(model.forward).parameters
    bert_fast.revert(model)
    assert type(model) is transformers.BertForMaskedLM
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (2, 9, config.vocab_size)
    with pytest.raises(TypeError, match="sparse_prediction"):
        bert_fast.optimize(transformers.BertForSequenceClassification(copy.deepcopy(config)), sparse_prediction=True)


# ---- HF Trainer with packed (flattened) batches ------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_trainer_with_flattening_collator(sparse, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    config = tiny_config(vocab_size=113)
    ref, _ = paired(transformers.BertForMaskedLM, transformers.BertForMaskedLM, config)
    ours = bert_fast.BertForMaskedLM(copy.deepcopy(config), sparse_prediction=sparse)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(5)
    features = []
    for n in (9, 23, 4, 16, 30, 2):
        ids = torch.randint(0, config.vocab_size, (n,))
        labels = torch.where(torch.rand(n) < 0.4, ids, torch.full_like(ids, -100))
        labels[0] = -100  # the flattening collator overwrites each first label with its separator
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    # One packed batch through our model = the padded batch through HF's (loss: mean over labels).
    batch = collate(features[:4])
    assert "cu_seq_lens_q" in batch and batch["input_ids"].shape[0] == 1
    ours.eval()
    with torch.no_grad():
        loss_packed = ours(**batch).loss
        lengths = [len(f["input_ids"]) for f in features[:4]]
        ids, mask, _ = random_batch(lengths, config, with_types=False)
        labels = torch.full_like(ids, -100)
        for i, f in enumerate(features[:4]):
            ids[i, : lengths[i]] = torch.tensor(f["input_ids"])
            labels[i, : lengths[i]] = torch.tensor(f["labels"])
        loss_padded = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss_packed.item() - loss_padded.item()) <= FP32_MODEL_ATOL

    before = ours.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=ours, args=args, train_dataset=features, data_collator=collate)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, ours.bert.encoder.layer[0].attention.self.query.weight)
