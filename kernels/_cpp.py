"""The C++/CUDA extension ``bert_fast._C``: its operator list.

The operators are registered with the PyTorch dispatcher by the extension
(``TORCH_LIBRARY(bert_fast, m)``): CPU kernels always, CUDA kernels when it was built with them.
The op files call ``torch.ops.bert_fast.<op>`` directly; each declares the op's fake (meta)
implementation once (:func:`bert_fast.kernels._dispatch.register_cpp_fake`), attached when the
extension is loaded and shared with the op's Triton custom op. Four backward ops (CPU only),
``bias_act_bwd``, ``bias_residual_layer_norm_bwd``, ``embed_layer_norm_bwd`` and
``varlen_attention_bwd``, serve autograd for their forward ops (``kernels/_autograd.py``); on CUDA
the Triton backward kernels serve.

Inputs are checked in C++ (``TORCH_CHECK``): a bad dtype, device, shape or stride raises a
``RuntimeError`` naming the op, the argument, the value and what was expected.

Importing this module loads the extension (``ImportError`` when it is not built).
"""

from __future__ import annotations

from . import _backend

if _backend.load_cpp_extension() is None:
    raise ImportError("bert_fast.kernels._cpp: " + _backend._CPP_HELP.format(why=""))

#: Every operator of the extension, ``torch.ops.bert_fast.<name>``.
OPS = _backend.CPP_OPS

