"""``optimize`` / ``revert``: switch one model instance to bert_fast's forward and back.

Only the instance's base model (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``,
``CamembertModel``, ``ElectraModel``, ``DistilBertModel``; :mod:`bert_fast.families`) changes class
(to a subclass of its own with bert_fast's forward); parameters are shared, never copied.
An explicit backend is checked here, once, for the model's
device and dtype: one that cannot serve an op of the model raises
:class:`~bert_fast.BackendUnavailableError` naming the op and the reason.
"""

from __future__ import annotations

from typing import Any

import transformers

from . import _plan
from ._inputs import check_config
from .families import Family, family_of, find_base_model, first_token_head
from .kernels._backend import _check_name

__all__ = ["optimize", "revert", "is_optimized", "_check_name", "fam_check_config"]

_fast_classes: dict[type, type] = {}

#: key in the base model's ``__dict__``: set when the task model around it pools position 0 of
#: ``last_hidden_state`` outside the encoder (``"first"``), or pools in a way packed input cannot serve.
_FIRST_TOKEN_HEAD = "_bert_fast_first_token_head"


def fam_check_config(fam: Family | None, config: transformers.PretrainedConfig) -> str:
    """:func:`check_config` with the family's field names; returns our activation name."""
    if fam is None or fam.act_field == "hidden_act":
        return check_config(config)
    return check_config(config, act=fam.activation(config), act_field=f"config.{fam.act_field}")


def _fast_class_for(cls: type) -> type:
    from .classes import DROP_IN_BASES
    from .modeling import _FastBertMixin

    if issubclass(cls, _FastBertMixin):
        return cls
    if cls in DROP_IN_BASES:
        return DROP_IN_BASES[cls]
    fast = _fast_classes.get(cls)
    if fast is None:
        fast = type(cls.__name__, (_FastBertMixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        _fast_classes[cls] = fast
    return fast


def _find_bert(model: Any) -> transformers.PreTrainedModel:
    """The base model inside ``model`` (itself, a task model's ``base_model``, or a SentenceTransformer's)."""
    base = find_base_model(model)
    if base is not None:
        return base
    try:  # sentence-transformers: the first module holding a transformers model
        from sentence_transformers import SentenceTransformer
    except Exception:  # pragma: no cover - optional dependency
        SentenceTransformer = None  # noqa: N806
    if SentenceTransformer is not None and isinstance(model, SentenceTransformer):
        for module in model.children():
            inner = getattr(module, "auto_model", None) or getattr(module, "model", None)
            if inner is not None:
                try:
                    return _find_bert(inner)
                except TypeError:
                    break
        raise TypeError(
            "bert_fast.optimize: this SentenceTransformer's first module does not wrap a supported encoder "
            "(BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT)"
        )
    raise TypeError(
        "bert_fast.optimize expects a transformers Bert*, Roberta*, XLMRoberta*, Camembert*, Electra* or DistilBert* "
        f"model (base or encoder task model), or a SentenceTransformer wrapping one; got {type(model).__name__}"
    )


def _set_sparse_prediction(model: Any, sparse_prediction: bool) -> None:
    """Switch sparse MLM prediction on or off for a ``BertForMaskedLM`` / ``BertForPreTraining``."""
    from .classes import _sparse_forward_for, _SparseMLMMixin

    if not isinstance(model, (transformers.BertForMaskedLM, transformers.BertForPreTraining)):
        if sparse_prediction:
            raise TypeError(
                f"bert_fast.optimize: sparse_prediction=True needs a BertForMaskedLM or BertForPreTraining, got "
                f"{type(model).__name__}; drop sparse_prediction for this model"
            )
        return
    if sparse_prediction and not isinstance(model, _SparseMLMMixin):
        cls = type(model)
        fast = _fast_classes.get(cls)
        if fast is None:
            attrs = {"__module__": cls.__module__, "__doc__": cls.__doc__, "forward": _sparse_forward_for(cls)}
            fast = type(cls.__name__, (_SparseMLMMixin, cls), attrs)
            _fast_classes[cls] = fast
        model.__dict__["_bert_fast_orig_task_class"] = cls
        model.__class__ = fast
    model.__dict__["_bert_fast_sparse_prediction"] = bool(sparse_prediction)


def optimize(
    model: Any, backend: str | None = None, cuda_graphs: bool = False, sparse_prediction: bool | None = None
) -> Any:
    """Upgrade ``model`` in place to bert_fast's padding-free fused forward; returns ``model``.

    ``model``: a transformers ``BertModel``, ``RobertaModel``, ``XLMRobertaModel``,
    ``CamembertModel``, ``ElectraModel`` or ``DistilBertModel``, any of their encoder task models
    (``*ForSequenceClassification``, ...), or a ``SentenceTransformer`` / ``CrossEncoder`` wrapping one.
    Parameters are shared, not copied; only this instance
    changes (its ``BertModel``'s class is switched to bert_fast's subclass). ``backend``:
    ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``; ``None`` follows
    :func:`bert_fast.use_backend` and ``BERT_FAST_BACKEND``. ``cuda_graphs``: replay the encoder
    from captured CUDA graphs in eval, no-grad CUDA forwards (:mod:`bert_fast.cuda_graphs`; a
    no-op on CPU); like ``backend``, each call sets it (``False`` switches graphs off).
    ``sparse_prediction`` (``BertForMaskedLM``
    and ``BertForPreTraining`` only): with ``labels``, run the MLM head on labelled positions only
    with the loss fused into the decoder; ``logits`` then hold only those rows (see
    :mod:`bert_fast._sparse_mlm`). ``None`` leaves the current setting.
    """
    from . import cuda_graphs as _cuda_graphs
    from .modeling import _FastBertMixin

    if backend is not None:
        _check_name(backend)
    bert = _find_bert(model)
    fam_check_config(family_of(bert), bert.config)
    check_backend(bert, backend)
    if not isinstance(bert, _FastBertMixin):
        bert.__dict__["_bert_fast_orig_class"] = type(bert)
        bert.__class__ = _fast_class_for(type(bert))
    bert.__dict__["_bert_fast_backend"] = backend
    head = first_token_head(model) if model is not bert else None
    if head is not None:
        bert.__dict__[_FIRST_TOKEN_HEAD] = head
    _cuda_graphs.set_option(bert, cuda_graphs)
    if sparse_prediction is not None:
        _set_sparse_prediction(model, sparse_prediction)
    _plan.clear(bert)
    return model


def check_backend(bert: transformers.BertModel, backend: str | None) -> None:
    """Raise :class:`~bert_fast.BackendUnavailableError` now if an explicit ``backend`` cannot serve
    ``bert`` on its current device and dtype (eval, no grad: the serving configuration)."""
    want = _plan._backend.requested_backend(backend)
    if want in ("auto", "torch"):
        return
    param = bert.embeddings.word_embeddings.weight
    if param.device.type == "meta":
        return
    _plan.build_plan(bert, param.device, param.dtype, False, False, want)


def revert(model: Any) -> Any:
    """Undo :func:`optimize`: ``model`` runs transformers' own forward again; returns ``model``."""
    from .modeling import _FastBertMixin

    bert = _find_bert(model)
    orig = bert.__dict__.pop("_bert_fast_orig_class", None)
    if orig is None and isinstance(bert, _FastBertMixin):
        # A bert_fast drop-in class: fall back to its transformers base.
        orig = next(
            c
            for c in type(bert).__mro__
            if issubclass(c, transformers.PreTrainedModel)
            and not issubclass(c, _FastBertMixin)
            and c.__module__.startswith("transformers.")
        )
    if orig is not None:
        bert.__class__ = orig
    bert.__dict__.pop("_bert_fast_backend", None)
    task_cls = model.__dict__.pop("_bert_fast_orig_task_class", None) if hasattr(model, "__dict__") else None
    if task_cls is not None:
        model.__class__ = task_cls
    if hasattr(model, "__dict__"):
        model.__dict__.pop("_bert_fast_sparse_prediction", None)
    bert.__dict__.pop("_bert_fast_cuda_graphs", None)
    bert.__dict__.pop(_FIRST_TOKEN_HEAD, None)
    _plan.clear(bert)
    return model


def is_optimized(model: Any) -> bool:
    from .modeling import _FastBertMixin

    return isinstance(_find_bert(model), _FastBertMixin)
