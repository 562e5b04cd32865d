"""End-to-end benchmark: bert_fast against what users would otherwise run, side by side.

``python -m bert_fast bench`` (see :mod:`bert_fast.cli`) calls :func:`run`, then
:func:`write_results` (JSON + CSV) and :func:`format_table`; ``python -m bert_fast plot`` reads the
JSON (:mod:`bert_fast.bench.plot`) and never measures.

Modules (each imported on first use of its names; nothing queries a GPU at import time):

* :mod:`~bert_fast.bench.workloads`: model presets, padding profiles and their lengths (the one
  place they are defined), workloads, FLOPs;
* :mod:`~bert_fast.bench.corpus`: the built-in text corpus and its sentence-transformers-style batches;
* :mod:`~bert_fast.bench.env`: device, CPU model and ISA, versions, git revision;
* :mod:`~bert_fast.bench.measure`: timing, peak memory, GPU peak FLOP/s;
* :mod:`~bert_fast.bench.providers`: the provider registry (name -> factory) and the PyTorch providers;
* :mod:`~bert_fast.bench.engines`: ONNX export, the ONNX Runtime and OpenVINO providers;
* :mod:`~bert_fast.bench.runner`: settings, the grid and the measurement loop;
* :mod:`~bert_fast.bench.report`: JSON/CSV, the record table and the ratio table;
* :mod:`~bert_fast.bench.plot`: PNG charts from a results file.
"""

from __future__ import annotations

from .env import cpu_isa, cpu_model, device_name, pick_device
from .measure import GPU_PEAK_TFLOPS, gpu_peak_tflops, measure_memory, percentile, time_call
from .providers import (
    REGISTRY,
    Context,
    Provider,
    ProviderSpec,
    Unavailable,
    build_provider,
    provider_names,
    register,
)
from .report import (
    BASELINE,
    CSV_COLUMNS,
    PEERS,
    RECORD_KEYS,
    SCHEMA_VERSION,
    STATUSES,
    format_ratio_table,
    format_table,
    write_results,
)
from .runner import Settings, default_grid, load_base_model, run, validate
from .workloads import (
    CORPUS_BATCH,
    DTYPES,
    MIXED32_LENGTHS,
    MIXED_LENGTHS,
    PEERS_CELLS,
    PRESET_COMMON,
    PRESETS,
    PROFILES,
    PresetConfig,
    Workload,
    cells,
    make_workload,
    model_flops,
    profile_lengths,
)

#: Provider names in registry order (the default ``--providers``).
PROVIDERS = provider_names()

__all__ = [
    "BASELINE", "CORPUS_BATCH", "CSV_COLUMNS", "Context", "DTYPES", "GPU_PEAK_TFLOPS", "MIXED32_LENGTHS",
    "MIXED_LENGTHS", "PEERS", "PEERS_CELLS", "PRESETS", "PRESET_COMMON", "PROFILES", "PROVIDERS", "PresetConfig",
    "Provider", "ProviderSpec", "RECORD_KEYS", "REGISTRY", "SCHEMA_VERSION", "STATUSES", "Settings", "Unavailable",
    "Workload",
    "build_provider", "cells", "cpu_isa", "cpu_model", "default_grid", "device_name", "format_ratio_table",
    "format_table", "gpu_peak_tflops", "load_base_model", "make_workload", "measure_memory", "model_flops",
    "percentile", "pick_device", "profile_lengths", "provider_names", "register", "run", "time_call", "validate",
    "write_results",
]  # fmt: skip
