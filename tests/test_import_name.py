"""The ``kernels/`` directory is ``bert_fast.kernels`` only, even when a checkout's root is on sys.path."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import sys
import bert_fast
import transformers.integrations.hub_kernels  # probes for Hugging Face's `kernels` package
from transformers.utils import import_utils
top = sys.modules.get("kernels")
assert top is None or getattr(top, "__file__", None) is None, f"our kernels/ ran as top-level 'kernels': {top}"
assert not import_utils.is_kernels_available()
assert not [m for m in sys.modules if m.startswith("kernels.")], "our op modules were imported a second time"
import torch
import bert_fast.kernels as K
x = torch.randn(4, 8)
assert torch.equal(K.bias_act(x, None, "relu"), torch.relu(x))
print("ok")
"""


def test_checkout_root_on_path_does_not_import_kernels_twice():
    # ``python -c`` from the repository root puts the root first on sys.path, as ``python -m pytest`` does.
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


_RAW_OPS_PROBE = """
import torch
import bert_fast.kernels as K
if K._backend.load_cpp_extension() is None:
    print("skip: extension not built")
    raise SystemExit(0)
import bert_fast._C  # noqa: F401
# a raw op, before any public functional ran: its fake must already be registered
torch.library.opcheck(torch.ops.bert_fast.bias_act.default, (torch.randn(3, 4), None, "gelu"))
print("ok")
"""


def test_raw_cpp_ops_have_fakes_right_after_import():
    proc = subprocess.run([sys.executable, "-c", _RAW_OPS_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("skip"):
        import pytest

        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("ok")
