"""Sparse masked-LM prediction: the MLM head on labelled positions only, the loss fused with the decoder.

HF's ``BertForMaskedLM`` projects every position of the batch onto the vocabulary (V = 30,522 for
BERT-base) and then reads the ~15% of positions that carry a label. With ``sparse_prediction=True``
(``BertForMaskedLM(config, sparse_prediction=True)``, ``from_pretrained(..., sparse_prediction=True)``
or ``bert_fast.optimize(model, sparse_prediction=True)``) and ``labels`` given:

* the positions with ``labels != -100`` are gathered first; the head transform (dense, activation,
  LayerNorm) and the decoder run on those rows only (FLOPs of the head: ``2 n H (H + V)`` for n
  labelled rows instead of the whole batch);
* the decoder GEMM and the cross-entropy are one op, :func:`linear_cross_entropy`, computed in
  chunks of rows (the Liger fused-linear-cross-entropy scheme): per chunk, logits in fp32, the
  log-sum-exp, the loss, and immediately the gradient of the logits (``softmax - onehot``) turned
  into the gradients of the hidden rows, of the decoder weight and of its bias. No (rows, V) logits
  tensor is kept for backward; what autograd keeps is the gradients themselves (the size of the
  inputs), and backward only scales them by the incoming gradient;
* ``logits`` of the output (``prediction_logits`` of ``BertForPreTraining``) hold **only the
  labelled rows**, in the order of ``labels.view(-1) != -100`` (row-major over the batch), shape
  (n, V); they are a by-product of the fused pass and carry no gradient.

The loss equals HF's ``CrossEntropyLoss()`` (mean over labelled positions). Without ``labels`` the
head runs densely as in HF. Autocast: the GEMMs run in the autocast dtype, logits, the softmax and
the accumulated weight gradients in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


#: Largest chunk of fp32 logits (elements): 2^22 = 16 MiB, 137 rows of BERT's 30,522-word vocabulary.
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(n: int, hidden: int, vocab: int) -> int:
    # Every chunk adds a (V, H) product into the weight gradient, so chunks must not be small (a
    # 1-row chunk would stream V H floats for 2 V H FLOPs); they are capped so that the fp32 logits
    # of one chunk stay within CHUNK_ELEMENTS whatever n is.
    return max(1, min(n, max(CHUNK_ELEMENTS // max(vocab, 1), 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, want_logits):  # type: ignore[override]
        n, vocab = h.shape[0], weight.shape[0]
        device = h.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = torch.promote_types(h.dtype, weight.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_h = torch.empty((n, h.shape[1]), dtype=dtype, device=device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
            grad_b = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_b else None
            logits_out = torch.empty((n, vocab), dtype=dtype, device=device) if want_logits else None
            step = _chunk_rows(n, h.shape[1], vocab)
            inv_n = 1.0 / max(n, 1)
            for s in range(0, n, step):
                e = min(n, s + step)
                x = hc[s:e]
                logits = torch.addmm(bias.to(dtype), x, wc.t()) if bias is not None else x @ wc.t()
                if logits_out is not None:
                    logits_out[s:e] = logits
                logits = logits.float()
                t = target[s:e]
                lse = torch.logsumexp(logits, dim=1)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w or need_b:
                    # d(mean loss)/d logits = (softmax - onehot) / n, computed in place over the chunk
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(e - s, device=device), t] -= 1.0
                    g.mul_(inv_n)
                    if need_b:
                        grad_b += g.sum(0)
                    gd = g.to(dtype)
                    if need_h:
                        torch.mm(gd, wc, out=grad_h[s:e])
                    if need_w:
                        grad_w += (gd.t() @ x).float()
            loss = loss * inv_n if n else loss + float("nan")  # HF: mean over no element is NaN
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if logits_out is not None:
            ctx.mark_non_differentiable(logits_out)
        return loss, logits_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes

        def scaled(g, dtype):
            return None if g is None else (g * grad_loss).to(dtype)

        return scaled(grad_h, dh), scaled(grad_w, dw), scaled(grad_b, db), None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cross_entropy(h @ weight.T + bias, target)`` (mean) without a (rows, V) tensor kept for backward.

    ``h``: (n, H); ``weight``: (V, H); ``bias``: (V,) or ``None``; ``target``: (n,) int64 in [0, V).
    Returns ``(loss, logits)``; ``logits`` (n, V) is ``None`` unless ``return_logits`` (no gradient).
    Memory: one chunk of fp32 logits at a time plus the gradients of the inputs; FLOPs: the three
    GEMMs of forward and backward, all in the forward pass.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} do not match")
    if target.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: target has shape {tuple(target.shape)}, expected ({h.shape[0]},)")
    return _LinearCrossEntropy.apply(h, weight, bias, target.long(), return_logits)


def _labelled_rows(sequence_output: torch.Tensor, labels: torch.Tensor):
    flat_labels = labels.reshape(-1).to(sequence_output.device)
    if flat_labels.numel() * sequence_output.shape[-1] != sequence_output.numel():
        raise ValueError(
            f"sparse_prediction: labels of shape {tuple(labels.shape)} do not match the sequence output "
            f"{tuple(sequence_output.shape[:-1])}"
        )
    idx = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, idx)
    return rows, flat_labels.index_select(0, idx)


def sparse_mlm(predictions: torch.nn.Module, sequence_output: torch.Tensor, labels: torch.Tensor):
    """(loss, logits of the labelled rows) of HF's ``BertLMPredictionHead`` ``predictions``."""
    rows, target = _labelled_rows(sequence_output, labels)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= predictions.decoder.weight.shape[0]):
        raise ValueError(
            f"sparse_prediction: labels must be -100 or in [0, {predictions.decoder.weight.shape[0]}); "
            f"got values in [{int(target.min())}, {int(target.max())}]"
        )
    h = predictions.transform(rows)
    dec = predictions.decoder
    return linear_cross_entropy(h, dec.weight, dec.bias, target)
