"""Other inference engines as providers: ONNX Runtime (with its BERT fusions) and OpenVINO.

Both run the same HF model (the fp32 weights of the run), converted once per model, with the
inputs the model takes (:func:`input_names`: no ``token_type_ids`` for DistilBERT):

* ``onnxruntime``: exported to ONNX with dynamic (batch, sequence) axes, then
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (its fused Attention /
  SkipLayerNormalization / BiasGelu operators); fp32 on CPU, fp16 on CUDA.
* ``openvino``: ``openvino.convert_model`` of the model with example inputs and fully dynamic
  (batch, sequence) input shapes, compiled for the CPU plugin with ``INFERENCE_PRECISION_HINT``
  f32 / bf16 / f16 for the cell's dtype (a precision this CPU does not support is reported
  unavailable: OpenVINO would silently run f32), ``PERFORMANCE_HINT=LATENCY`` and the run's thread
  count. Conversion and compilation time go to ``compile_s``, apart from run time.

A missing package is reported "unavailable" with the install command, never a crash.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .providers import Context, Provider, Unavailable, share_weights
from .workloads import Batch

#: The inputs of a model with token types, in export order (a model without them drops the last).
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def input_names(model: Any) -> tuple[str, ...]:
    """The inputs ``model`` is exported with: no ``token_type_ids`` for a family without token types."""
    from bert_fast.families import family_of

    fam = family_of(model)
    token_types = fam.has_token_types if fam is not None else hasattr(model.embeddings, "token_type_embeddings")
    return INPUT_NAMES if token_types else INPUT_NAMES[:2]


class _LastHidden(torch.nn.Module):
    """The HF model with positional inputs and ``last_hidden_state`` as the one output."""

    def __init__(self, bert: Any):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state


def _cpu_fp32_module(base: Any) -> _LastHidden:
    # On CUDA this needs a real copy: .cpu() on a weight-sharing copy would move the shared
    # Parameters of ``base`` too.
    bert = share_weights(base) if base.device.type == "cpu" else copy.deepcopy(base).cpu()
    return _LastHidden(bert).eval()


def _example_inputs(vocab_size: int, names: tuple[str, ...] = INPUT_NAMES) -> tuple[torch.Tensor, ...]:
    """A sample with padding in one row, so the traced graph keeps the masking path (one tensor per name)."""
    ids = torch.randint(1, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    return (ids * mask, mask, torch.zeros_like(ids))[: len(names)]


def onnx_export(base: Any, workdir: str) -> tuple[str, str]:
    """Export fp32 ``base`` to ONNX with dynamic (batch, sequence) axes; returns (path, exporter).

    The TorchScript exporter (``dynamo=False``, ``dynamic_axes``) yields the graph pattern that
    ONNX Runtime's BERT fusions (Attention, EmbedLayerNormalization) recognize; the dynamo
    exporter's graph (torch 2.9+ default) gets SkipLayerNormalization/BiasGelu but no fused
    Attention. The dynamo exporter (``dynamic_shapes``) is the fallback if the TorchScript one fails.
    """
    wrapped = _cpu_fp32_module(base)
    names = input_names(base)
    path = os.path.join(workdir, "model.onnx")
    common = dict(
        args=_example_inputs(base.config.vocab_size, names),
        f=path,
        input_names=list(names),
        output_names=["last_hidden_state"],
    )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("torchscript", dict(dynamic_axes={n: {0: "batch", 1: "sequence"} for n in (*names, "last_hidden_state")},
                             opset_version=17, dynamo=False)),
        ("dynamo", dict(dynamic_shapes={n: {0: batch, 1: seq} for n in names}, dynamo=True,
                        external_data=False)),
    ]  # fmt: skip
    failures = []
    for exporter, extra in attempts:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, **common, **extra)
            return path, exporter
        except Exception as exc:  # noqa: BLE001 - any failure: try the next exporter
            failures.append(f"{exporter} exporter: {type(exc).__name__}: {exc}")
    raise RuntimeError("ONNX export failed: " + "; ".join(failures))


def onnxruntime_provider(ctx: Context) -> Provider:
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:
        raise Unavailable(f"onnxruntime is not installed ({exc}); pip install 'bert_fast[bench]'") from exc
    device, dtype_name = ctx.device, ctx.dtype
    if device.type == "cuda":
        if dtype_name != "fp16":
            raise Unavailable("the onnxruntime provider runs fp16 on CUDA (fp32 on CPU)")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    elif dtype_name != "fp32":
        raise Unavailable("the onnxruntime provider runs fp32 on CPU (fp16 on CUDA)")

    gpu = device.type == "cuda"
    cfg = ctx.base.config
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bert_fast_onnx_") as workdir:
        path, exporter = onnx_export(ctx.base, workdir)
        opt = optimize_model(
            path, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size, use_gpu=gpu
        )
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if gpu:
            opt.convert_float_to_float16(keep_io_types=True)
        opt_path = os.path.join(workdir, "model_opt.onnx")
        opt.save_model_to_file(opt_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = ctx.threads if not gpu else 0
        # ONNX Runtime's pool threads spin after each run by default; in one process with
        # PyTorch's OpenMP threads on the same cores they steal the CPU the next provider needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(opt_path, so, providers=providers)
    compile_s = time.perf_counter() - t0
    notes = f"exporter {exporter}; fused ops " + ", ".join(f"{k} x{v}" for k, v in sorted(fused.items()))
    if not gpu:
        notes += f"; intra_op_num_threads {ctx.threads}, allow_spinning 0"
    hidden = cfg.hidden_size
    # The graph's own inputs: an exporter may drop one the traced graph does not read.
    names = {i.name for i in sess.get_inputs()}

    def prepare(b: Batch) -> Callable[[], Any]:
        if not gpu:
            feeds = {n: t.cpu().numpy() for n, t in b.kwargs().items() if n in names}
            return lambda: torch.from_numpy(sess.run(["last_hidden_state"], feeds)[0])
        import numpy as np

        binding = sess.io_binding()
        inputs = {n: t.contiguous() for n, t in b.kwargs().items() if n in names}
        for n, t in inputs.items():
            binding.bind_input(n, "cuda", device.index or 0, np.int64, tuple(t.shape), t.data_ptr())
        out = torch.empty(*b.input_ids.shape, hidden, dtype=torch.float32, device=device)
        binding.bind_output(
            "last_hidden_state", "cuda", device.index or 0, np.float32, tuple(out.shape), out.data_ptr()
        )

        def run():
            sess.run_with_iobinding(binding)
            return out

        return run

    notes += "; peak memory not measured (ONNX Runtime's own arena/allocator)"
    return Provider("onnxruntime", prepare=prepare, notes=notes, external_memory=True, backend=providers[0],
                    compile_s=compile_s)  # fmt: skip


#: OpenVINO's precision names and the ``OPTIMIZATION_CAPABILITIES`` entry each needs on the CPU.
_OV_PRECISION = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}


def openvino_provider(ctx: Context) -> Provider:
    try:
        import openvino as ov
    except ImportError as exc:
        raise Unavailable(f"openvino is not installed ({exc}); pip install 'bert_fast[bench]'") from exc
    if ctx.device.type != "cpu":
        raise Unavailable("the openvino provider runs on the CPU (OpenVINO has no NVIDIA GPU plugin)")
    hint, capability = _OV_PRECISION[ctx.dtype]
    core = ctx.cache.setdefault("openvino-core", ov.Core())
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if capability not in caps:
        raise Unavailable(
            f"OpenVINO's CPU plugin has no {capability} support on this CPU (capabilities: {', '.join(caps)}); "
            f"INFERENCE_PRECISION_HINT={hint} would silently run f32"
        )
    t0 = time.perf_counter()
    names = input_names(ctx.base)
    if "openvino-model" not in ctx.cache:  # one conversion per model, shared by its dtypes
        dyn = ov.PartialShape([-1, -1])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx.cache["openvino-model"] = ov.convert_model(
                _cpu_fp32_module(ctx.base),
                example_input=_example_inputs(ctx.base.config.vocab_size, names),
                input=[(n, dyn, ov.Type.i64) for n in names],
            )
    convert_s = time.perf_counter() - t0
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": str(ctx.threads)}  # fmt: skip
    t1 = time.perf_counter()
    compiled = core.compile_model(ctx.cache["openvino-model"], "CPU", config)
    compile_s = time.perf_counter() - t1
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    notes = (f"openvino {ov.__version__}; convert_model {convert_s:.1f} s, compile_model {compile_s:.1f} s; "
             f"INFERENCE_PRECISION_HINT {hint} (compiled: {got}), LATENCY, {ctx.threads} threads; "
             "peak memory not measured (OpenVINO's own allocator)")  # fmt: skip

    def prepare(b: Batch) -> Callable[[], Any]:
        request = compiled.create_infer_request()
        feeds = {n: t.cpu().numpy() for n, t in b.kwargs().items() if n in names}
        # share_inputs: no copy of the (prepared, untimed) inputs; outputs are copied out, as
        # ONNX Runtime's are, so that each call returns its own array.
        return lambda: torch.from_numpy(request.infer(feeds, share_inputs=True)[0])

    return Provider("openvino", prepare=prepare, notes=notes, external_memory=True, backend="openvino CPU",
                    compile_s=convert_s + compile_s)  # fmt: skip
