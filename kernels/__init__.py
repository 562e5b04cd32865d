"""bert_fast.kernels — the fused ops behind the model, as plain functions (no nn.Module).

Each op has a plain-PyTorch reference (``<op>_ref``: HF's exact semantics, the ``torch`` backend
and the test oracle) and fused backends (``triton``, ``cpp``) chosen per call by
:func:`~bert_fast.kernels._backend.resolve` (DESIGN.md §3).
"""

import sys as _sys

# This directory is the package ``bert_fast.kernels`` (setup.py's package_dir). From a checkout's root
# (``python -m pytest``, ``python -m bert_fast``) it is also visible as a top-level ``kernels``, a name
# transformers probes for (Hugging Face's ``kernels`` package) and imports when it finds no metadata
# for it. Executing this package a second time under that name would register every custom op and
# fake implementation twice and leave the first registrations dangling (the dispatcher then fails
# with "Tried to access the schema for  which doesn't have a schema registered yet", or worse).
# Under any other name it is replaced by an empty module without ``__file__``, which transformers
# reads as "not installed".
if __name__ == "bert_fast.kernels":
    from . import _backend
    from ._backend import BACKENDS, BackendUnavailableError, requested_backend, use_backend
    from .activation import ACTIVATIONS, HF_ACTIVATIONS, bias_act, bias_act_ref
    from .attention import varlen_attention, varlen_attention_ref
    from .embeddings import embed_layer_norm, embed_layer_norm_ref
    from .layer_norm import bias_residual_layer_norm, bias_residual_layer_norm_ref
    from .linear import linear, linear_ref, prepack_weight
    from .padding import gather_rows, gather_rows_ref, scatter_rows, scatter_rows_ref, unpad_mask, unpad_mask_ref

    # Load the C++ extension now (a shared library on the CPU; no GPU query): its ops get their fake
    # implementations at load, so torch.ops.bert_fast.* trace under torch.compile and pass opcheck even
    # when called directly, before any public functional has run. Not built: nothing happens here.
    _backend.load_cpp_extension()
else:
    _sys.modules[__name__] = type(_sys)(__name__)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "HF_ACTIVATIONS",
    "BackendUnavailableError",
    "bias_act",
    "bias_act_ref",
    "bias_residual_layer_norm",
    "bias_residual_layer_norm_ref",
    "embed_layer_norm",
    "embed_layer_norm_ref",
    "gather_rows",
    "gather_rows_ref",
    "linear",
    "linear_ref",
    "prepack_weight",
    "requested_backend",
    "scatter_rows",
    "scatter_rows_ref",
    "unpad_mask",
    "unpad_mask_ref",
    "use_backend",
    "varlen_attention",
    "varlen_attention_ref",
]
