"""Thin wrappers over ``torch.ops.bert_fast.*`` (the C++/CUDA extension ``bert_fast._C``).

Owned by the C++ extension work (issue 4); the op files call these when the ``cpp`` backend is
chosen, after :func:`~bert_fast.kernels._backend.resolve` made sure the extension is loaded.
"""
