"""Ahead-of-time compilation of every Triton kernel configuration we ship, for sm_80 and sm_90a.

The interpreter (used by the other Triton tests on CPU) forgives what the GPU compiler does not:
layouts, register pressure, shared memory. ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs Triton's whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas cubin) without a GPU,
so this test compiles each config the launchers can choose (every autotune config x every dtype x
every row-block / head_dim bucket), forward and backward kernels, and fails on a compile error or a register spill.

Spills: Triton fills ``n_spills`` only when a kernel is loaded on a device, so the compiled cubin's
resource usage is read with the ``cuobjdump`` Triton ships (``--dump-resource-usage``); a spill
shows up as a non-zero stack frame / local memory (our kernels have no local arrays).

Scope: each op module lists the specializations its launcher can choose (``aot_specs()``): every
autotune config with the heaviest variant (every optional input present), and each optional-input
variant and activation on one config per block; attention at head_dim 26, 32, 40, 64, 80 and 128.
The compile runs in subprocesses without ``TRITON_INTERPRET`` (the
interpreter replaces ``@triton.jit`` functions), sharded over the available cores.

Run directly (``python tests/test_triton_aot.py``) to print the resource table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

ARCHS = (80, 90)
DTYPES = ("bf16", "fp32")
#: fp16 compiles to the same 16-bit code path as bf16 (same MMA shapes and register layout; only the
#: conversion instructions differ), so it is compiled only where BERT_FAST_AOT_FP16=1 asks for it:
#: a third of the compile time of this test, which is the longest of the CI run.
HALF = ("fp16",) if os.environ.get("BERT_FAST_AOT_FP16") == "1" else ()
#: Per-block shared memory a kernel may use (the opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: The id dtype of the embedding kernels' index arguments (HF tokenizers give int64).
ID_TYPE = "i64"


# ----------------------------------------------------------------------------- worker side
def _jobs():
    """(label, kernel, signature, constexprs, num_warps, num_stages, divisible) for every shipped config.

    Each op module lists its own specializations (``aot_specs()``); this expands them per dtype.
    """
    from bert_fast.kernels import activation, attention, attention_backward, embeddings, embeddings_backward, layer_norm

    jobs = []
    for module in (layer_norm, embeddings, activation, attention, attention_backward, embeddings_backward):
        for spec in module.aot_specs():
            for dt in [d for d in spec.get("dtypes", DTYPES + HALF) if d in DTYPES + HALF]:
                sig = {name: ty.format(dt=dt, it=ID_TYPE) for name, ty in spec["signature"].items()}
                jobs.append(
                    (f"{spec['label']} {dt}", spec["kernel"], sig, spec["constexprs"], spec["num_warps"],
                     spec["num_stages"], spec.get("divisible", True))
                )  # fmt: skip
    return jobs


def _resource_usage(cubin: bytes) -> dict:
    """REG / SHARED / STACK / LOCAL of the one function in ``cubin``, via cuobjdump."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for field in line.split():
                name, _, value = field.partition(":")
                if value.isdigit():
                    usage[name] = int(value)
    return usage


def _worker(shard: int, num_shards: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jobs = _jobs()
    for index, (label, fn, signature, constexprs, num_warps, num_stages, divisible) in enumerate(jobs):
        if index % num_shards != shard:
            continue
        full_sig = dict(signature)
        for name in constexprs:
            full_sig[name] = "constexpr"
        assert list(full_sig) == [n for n in fn.arg_names if n in full_sig] and len(full_sig) == len(fn.arg_names), (
            f"{label}: signature does not cover the kernel's arguments {fn.arg_names}"
        )
        # Divisibility hints as the JIT derives them for BERT shapes: 16-byte aligned pointers and
        # strides / sizes that are multiples of 16 (hidden 768, 3 * hidden, ...). ``divisible=False``
        # specs (hidden % 16 != 0, e.g. 312) keep only the pointer alignment.
        attrs = {
            (fn.arg_names.index(n),): [["tt.divisibility", 16]]
            for n, ty in signature.items()
            if ty.startswith("*") or (divisible and (n.startswith("stride_") or n == "n_cols"))
        }
        for arch in ARCHS:
            record = {"label": label, "arch": arch}
            start = time.perf_counter()
            try:
                src = ASTSource(fn, full_sig, constexprs, attrs)
                kernel = triton.compile(
                    src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
                )
                record["shared"] = kernel.metadata.shared
                record["n_spills"] = getattr(kernel, "n_spills", None)  # only set once loaded on a device
                record.update(_resource_usage(kernel.asm["cubin"]))
            except Exception as exc:  # reported, the test fails on it
                record["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            record["seconds"] = round(time.perf_counter() - start, 2)
            print("AOT " + json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- test side
def _run_all(cache_dir: str) -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter replaces jit functions: compile for real
    env["TRITON_CACHE_DIR"] = cache_dir
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of triton <= 3.9, stated explicitly
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), str(shards)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(shards)
    ]
    records, failures = [], []
    for p in procs:
        out, err = p.communicate(timeout=900)
        records += [json.loads(line[4:]) for line in out.splitlines() if line.startswith("AOT ")]
        if p.returncode != 0:
            failures.append(f"worker exited with {p.returncode}:\n{err[-4000:]}")
    assert not failures, "\n".join(failures)
    return records


def _table(records: list[dict]) -> str:
    lines = [f"{'kernel config':78s} {'sm':>3s} {'regs':>5s} {'smem':>7s} {'stack':>6s} {'local':>6s} {'s':>6s}"]
    for r in sorted(records, key=lambda r: (r["label"], r["arch"])):
        if "error" in r:
            lines.append(f"{r['label']:78s} {r['arch']:>3d} ERROR {r['error'][:200]}")
        else:
            lines.append(
                f"{r['label']:78s} {r['arch']:>3d} {r.get('REG', -1):>5d} {r['shared']:>7d} {r.get('STACK', -1):>6d} "
                f"{r.get('LOCAL', -1):>6d} {r['seconds']:>6.2f}"
            )
    return "\n".join(lines)


triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_aot_compile_every_config_sm80_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    expected = sum(1 for _ in _jobs_count()) * len(ARCHS)
    records = _run_all(str(tmp_path / "triton_cache"))
    print("\n" + _table(records))
    assert len(records) == expected, f"{len(records)} compile records, expected {expected}"
    errors = [f"{r['label']} sm_{r['arch']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    missing = [f"{r['label']} sm_{r['arch']}" for r in records if "REG" not in r]
    assert not missing, "no resource usage read for:\n" + "\n".join(missing)
    spills = [
        f"{r['label']} sm_{r['arch']}: stack {r.get('STACK')} B, local {r.get('LOCAL')} B, n_spills {r['n_spills']}"
        for r in records
        if r.get("STACK", 0) or r.get("LOCAL", 0) or r["n_spills"]
    ]
    assert not spills, "register spills:\n" + "\n".join(spills)
    # Shared memory must fit each target's per-block opt-in limit.
    too_big = [
        f"{r['label']} sm_{r['arch']}: {r['shared']} B > {SHARED_LIMIT[r['arch']]} B"
        for r in records
        if r["shared"] > SHARED_LIMIT[r["arch"]]
    ]
    assert not too_big, "shared memory over the per-block limit:\n" + "\n".join(too_big)


def test_aot_specs_cover_the_launched_specializations():
    """The specs name BERT's head dims and every optional-input variant of each kernel."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import json\n"
        "from bert_fast.kernels import activation, attention, embeddings, layer_norm\n"
        "print(json.dumps({m.__name__.rsplit('.', 1)[1]: [dict(s['constexprs'], divisible=s.get('divisible', True))\n"
        "    for s in m.aot_specs()] for m in (activation, attention, embeddings, layer_norm)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    specs = json.loads(out.strip().splitlines()[-1])
    assert {32, 64, 128} <= {c["HEAD_DIM"] for c in specs["attention"]}
    assert {(c["HAS_LINEAR_BIAS"], c["HAS_RESIDUAL"]) for c in specs["layer_norm"]} == {
        (True, True), (True, False), (False, True), (False, False)
    }
    # fused dropout (training): the model's variants, at BERT's head dims and row blocks
    for d in (64, 128):
        assert {c["DROPOUT"] for c in specs["attention"] if c["HEAD_DIM"] == d} == {True, False}
    ln = {(c["BLOCK_H"], c["DROPOUT"]) for c in specs["layer_norm"] if c["HAS_LINEAR_BIAS"] and c["HAS_RESIDUAL"]}
    assert {(b, d) for b in (512, 1024) for d in (True, False)} <= ln
    assert {(c["HAS_INPUTS_EMBEDS"], c["HAS_TOKEN_TYPES"]) for c in specs["embeddings"]} == {
        (True, True), (True, False), (False, True), (False, False)
    }
    assert {(c["ACTIVATION"], c["HAS_BIAS"]) for c in specs["activation"]} == {
        (a, b) for a in range(3) for b in (True, False)
    }
    assert {512, 1024} <= {c["BLOCK_H"] for c in specs["layer_norm"]}
    # hidden % 16 != 0 (TinyBERT's 312): the row kernels without the divisibility hints
    assert any(not c["divisible"] for c in specs["layer_norm"]) and any(not c["divisible"] for c in specs["embeddings"])


def _jobs_count():
    """The job list, enumerated in a subprocess too (this process may run under the interpreter)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, __file__, "--count"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return range(int(out.strip().splitlines()[-1]))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--count":
        print(len(_jobs()))
    else:
        with tempfile.TemporaryDirectory() as cache:
            recs = _run_all(cache)
        print(_table(recs))
