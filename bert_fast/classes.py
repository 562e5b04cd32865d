"""The drop-in classes: transformers' ``Bert*`` (and every family's) classes whose encoder runs
bert_fast's padding-free forward (:mod:`bert_fast.modeling`), with ``backend=``, ``cuda_graphs=`` and,
for the MLM heads, ``sparse_prediction=`` in the constructor and in ``from_pretrained``.

``bert_fast.BertModel`` etc. resolve here; :func:`bert_fast.optimize` switches an instance's class to
the drop-in of its transformers class (``DROP_IN_BASES``) or to a per-class subclass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers

from . import cuda_graphs as _cuda_graphs
from ._inputs import check_config
from ._optimize import _check_name, check_backend, fam_check_config, optimize
from .families import FAMILIES, Family, family_of
from .modeling import _FastBertMixin

# --------------------------------------------------------------------------------------------------


class _DropIn:
    """Shared by the drop-in classes: ``backend=`` and ``cuda_graphs=`` in the constructor and in
    ``from_pretrained``."""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, *args, backend: str | None = None, cuda_graphs: bool = False, sparse_prediction: bool | None = None,
        **kwargs,
    ):
        if backend is not None:
            _check_name(backend)
        model = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        optimize(model, backend=backend, cuda_graphs=cuda_graphs, sparse_prediction=sparse_prediction)
        return model


class BertModel(_FastBertMixin, _DropIn, transformers.BertModel):
    """``transformers.BertModel`` with bert_fast's forward. Same weights, same outputs."""

    def __init__(self, config, *args, backend: str | None = None, cuda_graphs: bool = False, **kwargs):
        check_config(config)
        super().__init__(config, *args, **kwargs)
        self.__dict__["_bert_fast_backend"] = None if backend is None else _check_name(backend)
        check_backend(self, backend)
        _cuda_graphs.set_option(self, cuda_graphs)


class _SparseMLMMixin:
    """Mixed in before ``transformers.BertForMaskedLM`` / ``BertForPreTraining``: sparse MLM prediction.

    When the instance was built or optimized with ``sparse_prediction=True`` and ``labels`` are
    given, the MLM head runs only on labelled positions and its loss is fused with the decoder
    (:mod:`bert_fast._sparse_mlm`); ``logits`` / ``prediction_logits`` then hold only those rows.
    Otherwise transformers' forward runs unchanged.
    """

    def forward(self, *args: Any, **kwargs: Any):
        if not self.__dict__.get("_bert_fast_sparse_prediction"):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        bound = inspect.signature(super().forward).bind(*args, **kwargs)  # type: ignore[misc]
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        labels = call.pop("labels", None)
        if labels is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import MaskedLMOutput
        from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

        from ._sparse_mlm import sparse_mlm

        return_dict = call.pop("return_dict", None)
        next_sentence_label = call.pop("next_sentence_label", None)
        pretraining = isinstance(self, transformers.BertForPreTraining)
        outputs = self.bert(**call, return_dict=True)
        predictions = self.cls.predictions
        mlm_loss, logits = sparse_mlm(predictions, outputs[0], labels)
        if pretraining:
            nsp = self.cls.seq_relationship(outputs[1])
            loss = None
            if next_sentence_label is not None:
                nsp_loss = torch.nn.functional.cross_entropy(nsp.view(-1, 2), next_sentence_label.view(-1))
                loss = mlm_loss + nsp_loss
            out = BertForPreTrainingOutput(
                loss=loss,
                prediction_logits=logits,
                seq_relationship_logits=nsp,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        else:
            out = MaskedLMOutput(
                loss=mlm_loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )
        return out if return_dict is not False else out.to_tuple()


def _sparse_forward_for(base: type):
    """``_SparseMLMMixin.forward`` carrying ``base.forward``'s signature (HF Trainer reads it to decide
    which batch columns the model takes; ``(*args, **kwargs)`` would make it drop them all)."""

    def forward(self, *args: Any, **kwargs: Any):
        return _SparseMLMMixin.forward(self, *args, **kwargs)

    functools.update_wrapper(forward, base.forward)
    return forward


def _base_class(base: type) -> type:
    """The drop-in base model of a family (``RobertaModel``, ``ElectraModel``, ...), as ``BertModel``."""
    fam = family_of(base)

    def __init__(self, config, *args, backend: str | None = None, cuda_graphs: bool = False, **kwargs):
        fam_check_config(fam, config)
        base.__init__(self, config, *args, **kwargs)
        self.__dict__["_bert_fast_backend"] = None if backend is None else _check_name(backend)
        check_backend(self, backend)
        _cuda_graphs.set_option(self, cuda_graphs)

    return type(
        base.__name__,
        (_FastBertMixin, _DropIn, base),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``transformers.{base.__name__}`` with bert_fast's forward. Same weights, same outputs.",
        },
    )


def _task_class(base: type, fam: Family | None = None) -> type:
    sparse = base in (transformers.BertForMaskedLM, transformers.BertForPreTraining)

    def __init__(
        self, config, *args, backend: str | None = None, cuda_graphs: bool = False,
        sparse_prediction: bool | None = None, **kwargs,
    ):  # fmt: skip
        if fam is None:
            check_config(config)
        else:
            fam_check_config(fam, config)
        base.__init__(self, config, *args, **kwargs)
        optimize(self, backend=backend, cuda_graphs=cuda_graphs, sparse_prediction=sparse_prediction)

    return type(
        base.__name__,
        (_DropIn, _SparseMLMMixin, base) if sparse else (_DropIn, base),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``transformers.{base.__name__}`` whose encoder runs bert_fast's forward.",
            **({"forward": _sparse_forward_for(base)} if sparse else {}),
        },
    )


BertForMaskedLM = _task_class(transformers.BertForMaskedLM)
BertForPreTraining = _task_class(transformers.BertForPreTraining)
BertForNextSentencePrediction = _task_class(transformers.BertForNextSentencePrediction)
BertForSequenceClassification = _task_class(transformers.BertForSequenceClassification)
BertForTokenClassification = _task_class(transformers.BertForTokenClassification)
BertForQuestionAnswering = _task_class(transformers.BertForQuestionAnswering)
BertForMultipleChoice = _task_class(transformers.BertForMultipleChoice)


#: transformers base class -> its drop-in (``optimize`` switches an instance's class to it).
DROP_IN_BASES: dict[type, type] = {transformers.BertModel: BertModel}


def _make_family_classes() -> list[str]:
    """The drop-in classes of every non-BERT family present in this transformers version."""
    names = []
    for fam in FAMILIES:
        for name in fam.classes:
            hf_cls = getattr(transformers, name, None)
            if hf_cls is None:
                continue
            cls = _base_class(hf_cls) if name == fam.base else _task_class(hf_cls, fam)
            if name == fam.base:
                DROP_IN_BASES[hf_cls] = cls
            globals()[name] = cls
            names.append(name)
    return names


FAMILY_CLASSES = _make_family_classes()
