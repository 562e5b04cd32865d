"""bert_fast — a drop-in BERT encoder for PyTorch whose hot paths run on fused kernels.

* ``from bert_fast import BertModel`` (and every other ``Bert*`` class of transformers): same
  checkpoints, same outputs, padding-free fused execution.
* The same for the BERT family (:mod:`bert_fast.families`): ``RobertaModel``, ``XLMRobertaModel``,
  ``CamembertModel``, ``ElectraModel``, ``DistilBertModel`` and their encoder task classes.
* ``bert_fast.optimize(model)`` upgrades a transformers model of any of those families or a
  sentence-transformers model in place; ``bert_fast.revert(model)`` undoes it.
* ``bert_fast.use_backend("triton" | "cpp" | "torch" | "auto")`` picks the engine for a block.
* ``bert_fast.optimize(model, cuda_graphs=True)`` and ``bert_fast.warmup(model, ...)``: on a GPU,
  the encoder replayed from CUDA graphs per shape bucket (:mod:`bert_fast.cuda_graphs`).
"""

from __future__ import annotations

from .encoder import Encoder as Encoder
from .kernels import BackendUnavailableError as BackendUnavailableError
from .kernels import use_backend as use_backend

__version__ = "0.1.0"

_MODELING = {
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
    "optimize",
    "revert",
    "is_optimized",
}

_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
_FAMILY_CLASSES = {
    f"{prefix}{suffix}"
    for prefix in ("Roberta", "XLMRoberta", "Camembert", "Electra", "DistilBert")
    for suffix in ("Model", "ForMultipleChoice", *_HEADS)
} | {"ElectraForPreTraining"}
_MODELING |= _FAMILY_CLASSES

__all__ = sorted(_MODELING | {"BackendUnavailableError", "Encoder", "use_backend", "warmup", "__version__"})


def __getattr__(name: str):
    # transformers is imported on first use of the model API, not when the kernels are imported.
    if name in _MODELING:
        if name in ("optimize", "revert", "is_optimized"):
            from . import _optimize

            return getattr(_optimize, name)
        from . import classes

        return getattr(classes, name)
    if name == "warmup":  # CUDA graphs: capture the buckets a server will see (bert_fast.cuda_graphs)
        from .cuda_graphs import warmup

        return warmup
    raise AttributeError(f"module 'bert_fast' has no attribute {name!r}")
