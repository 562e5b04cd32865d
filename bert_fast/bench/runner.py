"""The run: settings, the grid of cells, and the measurement of every provider on every cell.

Timing: eval mode, ``torch.inference_mode``; ``warmup`` untimed calls, then ``repeats`` timed
rounds. In each round every provider runs once, the starting provider rotating from round to
round, so that load from other processes falls on all providers alike. A multi-batch workload
(``corpus``) is one call: all its batches, one after another. Reported: median and p90 latency,
sequences/s and real (non-padding) tokens/s from the median.

Peak memory and accuracy come from one extra untimed call per provider and cell: max |output -
HF fp32 eager output| of ``last_hidden_state`` over valid (non-padding) tokens. Padded positions
are each implementation's to define and are not compared.

On CUDA, MFU: useful FLOPs (linear layers and attention on real tokens only,
:func:`~bert_fast.bench.workloads.model_flops`) per second over the device's peak dense FLOP/s for
the dtype (:data:`~bert_fast.bench.measure.GPU_PEAK_TFLOPS` or ``--peak-tflops``).

A provider that cannot run is reported ``unavailable`` with the reason, one that fails ``error``
with the message, and the run goes on. Cells not started before ``time_budget_s`` ran out are
``skipped``. ``checkpoint`` (if given) receives the results so far after every cell, so that a run
cut short still leaves its measured cells behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import env, measure
from .providers import REGISTRY, Context, Provider, build_provider, describe_error, is_unavailable
from .report import RECORD_KEYS, SCHEMA_VERSION, add_speedups
from .workloads import DTYPES, PRESET_COMMON, PRESETS, PROFILES, Workload, cells, make_workload, model_flops


@dataclasses.dataclass
class Settings:
    """Everything that defines a run; stored verbatim in the results."""

    models: list[str] = dataclasses.field(default_factory=lambda: ["base"])
    device: str = "auto"
    dtypes: list[str] | None = None
    batch_sizes: list[int] | None = None
    seq_lens: list[int] | None = None
    profiles: list[str] | None = None
    providers: list[str] = dataclasses.field(default_factory=lambda: list(REGISTRY))
    repeats: int | None = None
    warmup: int | None = None
    seed: int = 0
    threads: int | None = None
    varlen_min_fraction: float = 0.125
    corpus_size: int = 256
    time_budget_s: float | None = None
    compile_dynamic: str = "auto"
    peak_tflops: float | None = None

    def resolve_defaults(self, device: torch.device) -> Settings:
        """Fill the grid left open with the default for ``device`` (see :func:`default_grid`)."""
        out = dataclasses.replace(self)
        for key, value in default_grid(device).items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        return out


def default_grid(device: torch.device) -> dict[str, Any]:
    """The grid used for options not given on the command line.

    CPU: sized to finish well within 5 minutes on a shared 2-core machine: one batch shape (8 x 128)
    shared by the mixed-length workload and the unpadded one, so that ``torch.compile`` compiles
    once, in fp32 only (each further dtype costs another compile and another full set of cells; ask
    for it with ``--dtypes fp32,bf16``).
    """
    if device.type == "cuda":
        return dict(dtypes=["fp16", "bf16"], batch_sizes=[8, 32], seq_lens=[128, 512],
                    profiles=["fixed", "varlen", "mixed"], repeats=20, warmup=3)  # fmt: skip
    return dict(dtypes=["fp32"], batch_sizes=[8], seq_lens=[128], profiles=["mixed", "fixed"], repeats=3, warmup=1)


def validate(settings: Settings) -> None:
    """Raise ``SystemExit`` naming the option for anything the run cannot do."""
    for d in settings.dtypes or []:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    for p in settings.profiles or []:
        if p not in PROFILES:
            raise SystemExit(f"--profiles: unknown profile {p!r}; expected one of {', '.join(PROFILES)}")
    for p in settings.providers:
        if p not in REGISTRY:
            raise SystemExit(f"--providers: unknown provider {p!r}; expected one of {', '.join(REGISTRY)}")
    for name, values in (("--batch-sizes", settings.batch_sizes), ("--seq-lens", settings.seq_lens)):
        if any(v < 1 for v in values or []):
            raise SystemExit(f"{name} must be positive integers (got {values})")
    if settings.repeats is not None and settings.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if settings.warmup is not None and settings.warmup < 0:
        raise SystemExit("--warmup must be 0 or more")
    if settings.corpus_size < 1:
        raise SystemExit("--corpus-size must be at least 1")
    if settings.compile_dynamic not in ("auto", "true", "false"):
        raise SystemExit("--compile-dynamic must be auto, true or false")


def load_base_model(spec: str, device: torch.device, seed: int) -> tuple[Any, str, str]:
    """(fp32 HF eager base model of a BERT family in eval mode, display name, source description)."""
    import transformers

    from ..families import FAMILIES

    def base_class(model_type: str) -> Any:  # the transformers base model of a BERT-family model_type
        for fam in FAMILIES:
            if model_type in fam.model_types:
                return getattr(transformers, fam.base)
        raise SystemExit(f"--model {spec!r}: model_type {model_type!r} is not a BERT-family encoder")

    if spec in PRESETS:
        fields = {**PRESET_COMMON, **PRESETS[spec]}
        model_type = fields.pop("model_type", "bert")
        config = transformers.AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        model = base_class(model_type)._from_config(config, attn_implementation="eager", dtype=torch.float32)
        source, name = f"preset {spec}: random weights, seed {seed}", spec
    elif os.path.isdir(spec):
        model_type = transformers.AutoConfig.from_pretrained(spec, local_files_only=True).model_type
        model = base_class(model_type).from_pretrained(
            spec, attn_implementation="eager", dtype=torch.float32, local_files_only=True
        )
        source, name = f"checkpoint {os.path.abspath(spec)}", os.path.basename(os.path.normpath(spec))
    else:
        raise SystemExit(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a local checkpoint directory")
    return model.to(device).eval(), name, source


def _model_shape(base: Any) -> dict[str, Any]:
    """What the workloads and the FLOP count need to know of ``base``: token types, pooler, longest input."""
    from ..families import family_of

    fam = family_of(base)
    config = base.config
    token_types = fam.has_token_types if fam is not None else hasattr(base.embeddings, "token_type_embeddings")
    max_length = int(config.max_position_embeddings)
    if fam is not None and fam.padding_positions:  # RoBERTa-style positions start after the padding index
        max_length -= int(config.pad_token_id) + 1
    return {"token_types": token_types, "pooler": getattr(base, "pooler", None) is not None, "max_length": max_length}


@contextlib.contextmanager
def _no_triton_interpreter(device: torch.device) -> Iterator[None]:
    """On CPU, keep the Triton interpreter (a test tool) out of the benchmark's ``auto`` backend."""
    old = os.environ.get("TRITON_INTERPRET")
    if device.type == "cpu" and old not in (None, "", "0"):
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _results(meta: dict, settings: Settings, records: list[dict], env_cols: dict) -> dict[str, Any]:
    add_speedups(records)
    for r in records:
        r.update(env_cols)
    return {
        "schema": SCHEMA_VERSION,
        "meta": meta,
        "settings": dataclasses.asdict(settings),
        "records": [{k: r.get(k) for k in (*RECORD_KEYS, "model_source")} for r in records],
    }


def run(
    settings: Settings,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark grid; return ``{"schema", "meta", "settings", "records"}`` (not written)."""
    from tqdm.auto import tqdm

    device = env.pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings = settings.resolve_defaults(device)
    validate(settings)
    started = time.perf_counter()
    meta = env.environment(device)
    meta["peak_memory_method"] = (
        "CUDA max_memory_allocated during one forward minus memory allocated before it"
        if device.type == "cuda"
        else "growth of peak RSS (VmHWM after /proc/self/clear_refs reset, after malloc_trim) during one forward"
    )
    env_cols = {k: meta[k] for k in ("torch", "transformers", "bert_fast", "onnxruntime", "device_name", "threads",
                                     "git_revision")}  # fmt: skip

    grid = cells(settings.profiles or [], settings.batch_sizes or [], settings.seq_lens or [])
    per_cell_calls = settings.warmup + settings.repeats + 1
    total = len(settings.models) * len(grid) * len(settings.dtypes) * len(settings.providers) * per_cell_calls
    bar = tqdm(total=total, disable=not progress, unit="call", dynamic_ncols=True, file=sys.stderr)
    records: list[dict[str, Any]] = []
    budget = settings.time_budget_s

    def save(partial: bool) -> dict[str, Any]:
        meta["wall_s"] = round(time.perf_counter() - started, 3)
        meta["loadavg_end"] = env.loadavg()
        meta["partial"] = partial
        return _results(meta, settings, [dict(r) for r in records], env_cols)

    with _no_triton_interpreter(device):
        for mi, spec in enumerate(settings.models):
            deadline = None if budget is None else started + budget * (mi + 1) / len(settings.models)
            bar.set_description(f"{spec}: building")
            base, model_name, source = load_base_model(spec, device, settings.seed)
            config = base.config
            shape = _model_shape(base)
            # Typed copies (weights cast once per dtype) and their providers, all kept alive so
            # that every cell measures all providers in interleaved rounds.
            groups: dict[str, list[Provider]] = {}
            cache: dict[str, Any] = {}
            for dname in settings.dtypes:
                typed = base if dname == "fp32" else copy.deepcopy(base).to(DTYPES[dname])
                ctx = Context(base, typed, device, dname, settings.seed, torch.get_num_threads(),
                              settings.compile_dynamic, cache)  # fmt: skip
                groups[dname] = []
                for pname in settings.providers:
                    bar.set_description(f"{model_name} {dname}: setting up {pname}")
                    groups[dname].append(build_provider(pname, ctx))

            for profile, batch, seq_len in grid:
                w = make_workload(profile, batch, seq_len, config.vocab_size, settings.seed, device,
                                  settings.varlen_min_fraction, settings.corpus_size,
                                  token_types=shape["token_types"], max_length=shape["max_length"])  # fmt: skip
                cell_base = dict(
                    model=model_name, model_source=source, device=str(device), batch=w.batch, seq_len=w.seq_len,
                    profile=profile, real_tokens=w.real_tokens, padding_fraction=round(w.padding_fraction, 6),
                    lengths=list(w.lengths), num_batches=len(w.batches), repeats=settings.repeats,
                    warmup=settings.warmup, workload_notes=w.notes,
                )  # fmt: skip
                skip = None
                if w.seq_len > shape["max_length"]:
                    skip = f"sequence length {w.seq_len} exceeds the model's maximum of {shape['max_length']}"
                elif deadline is not None and time.perf_counter() > deadline:
                    skip = f"time budget of {budget:g} s reached"
                if skip is not None:
                    for dname in settings.dtypes:
                        for prov in groups[dname]:
                            records.append(_record(cell_base, dname, prov.name, "skipped", skip))
                            bar.update(per_cell_calls)
                    continue
                with torch.inference_mode():
                    bar.set_description(f"{model_name} {w.batch}x{w.seq_len} {profile}: fp32 eager reference")
                    refs = [base(**b.kwargs()).last_hidden_state.float()[b.valid] for b in w.batches]
                    for dname in settings.dtypes:
                        records.extend(_measure_cell(groups[dname], w, cell_base, dname, config, device, settings,
                                                     refs, bar, model_name, shape["pooler"]))  # fmt: skip
                del refs
                if checkpoint is not None:
                    checkpoint(save(partial=True))
            del groups, cache, base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    return save(partial=False)


def _record(cell_base: dict, dtype: str, provider: str, status: str, reason: str | None = None, **kw) -> dict:
    rec = dict(cell_base, dtype=dtype, provider=provider, status=status, reason=reason)
    rec.update(kw)
    return rec


def _bind(prov: Provider, w: Workload) -> Callable[[], list[Any]]:
    fns = [prov.bind(b) for b in w.batches]
    if len(fns) == 1:
        fn = fns[0]
        return lambda: [fn()]
    return lambda: [f() for f in fns]


def _measure_cell(
    provs: list[Provider],
    w: Workload,
    cell_base: dict,
    dname: str,
    config: Any,
    device: torch.device,
    settings: Settings,
    refs: list[torch.Tensor],
    bar: Any,
    model_name: str,
    pooler: bool = True,
) -> list[dict]:
    per_cell_calls = settings.warmup + settings.repeats + 1
    label = f"{model_name} {dname} {w.batch}x{w.seq_len} {w.profile}"
    state: dict[str, dict[str, Any]] = {}
    runnable: list[Provider] = []
    for prov in provs:
        st = state[prov.name] = {"times": [], "warmup_s": 0.0, "status": "ok", "reason": None}
        if prov.unavailable or prov.error:
            failed = ("unavailable", prov.unavailable) if prov.unavailable else ("error", prov.error)
            st["status"], st["reason"] = failed
            bar.update(per_cell_calls)
            continue
        bar.set_description(f"{label}: warmup {prov.name}")
        try:
            fn = st["fn"] = _bind(prov, w)
            for _ in range(settings.warmup):
                st["warmup_s"] += measure.time_call(fn, device)
                bar.update(1)
        except Exception as exc:  # noqa: BLE001
            _fail(st, exc, prov)
            bar.update(per_cell_calls)
            continue
        runnable.append(prov)

    # Timed rounds: every runnable provider once per round, the starting one rotating.
    for r in range(settings.repeats):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)] if runnable else []
        for prov in order:
            st = state[prov.name]
            if st["status"] != "ok":
                continue
            bar.set_description(f"{label}: round {r + 1}/{settings.repeats}")
            try:
                st["times"].append(measure.time_call(st["fn"], device))
            except Exception as exc:  # noqa: BLE001
                _fail(st, exc, prov)
                bar.update(settings.repeats - r)
                continue
            bar.update(1)

    out = []
    for prov in provs:
        st = state[prov.name]
        extra: dict[str, Any] = dict(setup_s=round(prov.setup_s, 3), backend=prov.backend, notes=prov.notes,
                                     compile_s=None if prov.compile_s is None else round(prov.compile_s, 3))
        if st["status"] == "ok":
            bar.set_description(f"{label}: memory/accuracy {prov.name}")
            try:
                res, peak = measure.measure_memory(st["fn"], device, external=prov.external_memory)
            except Exception as exc:  # noqa: BLE001
                _fail(st, exc, prov)
                res, peak = None, None
            bar.update(1)
        if st["status"] != "ok":
            out.append(_record(cell_base, dname, prov.name, st["status"], st["reason"], **extra))
            continue
        times = st["times"]
        med = measure.percentile(times, 50)
        err = None
        if res is not None and all(x is not None for x in res):
            err = max(float((x.float()[b.valid] - ref).abs().max().item()) for x, b, ref in zip(res, w.batches, refs))
        flops = model_flops(config, w.lengths, linear_only=prov.name == "linear-floor", pooler=pooler)
        peak_tf, peak_src = (None, None)
        if device.type == "cuda":
            peak_tf, peak_src = measure.gpu_peak_tflops(torch.cuda.get_device_name(device), dname,
                                                        settings.peak_tflops)  # fmt: skip
        achieved = flops / med / 1e12
        if peak_src:
            extra["notes"] = "; ".join(x for x in (extra["notes"], f"peak {peak_tf} TFLOP/s from {peak_src}") if x)
        out.append(_record(
            cell_base, dname, prov.name, "ok", None,
            latency_ms_median=med * 1e3, latency_ms_p90=measure.percentile(times, 90) * 1e3,
            latency_ms_min=min(times) * 1e3, latencies_ms=[t * 1e3 for t in times],
            seqs_per_s=w.batch / med, tokens_per_s=w.real_tokens / med, peak_mem_mb=peak, max_abs_err=err,
            flops=flops, achieved_tflops=achieved, mfu=(achieved / peak_tf) if peak_tf else None,
            peak_tflops=peak_tf, warmup_s=round(st["warmup_s"], 3), **extra,
        ))  # fmt: skip
        st.pop("fn", None)
    return out


def _fail(st: dict, exc: BaseException, prov: Provider) -> None:
    unavailable = is_unavailable(exc)
    st["status"] = "unavailable" if unavailable else "error"
    st["reason"] = str(exc) if unavailable else describe_error(exc)
    st.pop("fn", None)
    if unavailable:
        prov.unavailable = st["reason"]  # no retry on later cells
