"""Ahead-of-time compilation of every Triton kernel configuration we ship, for sm_80 and sm_90a.

The interpreter (used by the other Triton tests on CPU) forgives what the GPU compiler does not:
layouts, register pressure, shared memory. ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs Triton's whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas cubin) without a GPU,
so this test compiles each config the launchers can choose (every autotune config x every dtype x
every row-block / head_dim bucket) and fails on a compile error or a register spill.

Spills: Triton fills ``n_spills`` only when a kernel is loaded on a device, so the compiled cubin's
resource usage is read with the ``cuobjdump`` Triton ships (``--dump-resource-usage``); a spill
shows up as a non-zero stack frame / local memory (our kernels have no local arrays).

Scope, to stay within a few minutes on two cores: kernels with optional inputs are compiled with
every optional input present (the superset: most live registers); ``bias_act`` compiles every
config and dtype with exact GELU (the heaviest activation) and the two other activations with every
dtype on one config. The compile runs in subprocesses without ``TRITON_INTERPRET`` (the
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
DTYPES = ("fp16", "bf16", "fp32")
ROW_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)  # hidden 37..4096
HEAD_DIM_BUCKETS = (32, 64, 128)
#: A representative head_dim per bucket (the non-power-of-two ones exercise the masks).
HEAD_DIM_OF_BUCKET = {32: 26, 64: 40, 128: 80}
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# ----------------------------------------------------------------------------- worker side
def _jobs():
    """(label, kernel, signature, constexprs, num_warps, num_stages) for every shipped config."""
    import torch
    from bert_fast.kernels import _triton_utils as tu
    from bert_fast.kernels import activation, attention, embeddings, layer_norm

    jobs = []
    for dt in DTYPES:
        for block in ROW_BLOCKS:
            for cfg in tu.row_configs(block):
                ln_sig = {
                    "X": f"*{dt}", "Residual": f"*{dt}", "LinearBias": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                    "Y": f"*{dt}", "stride_x_row": "i32", "stride_residual_row": "i32", "stride_y_row": "i32",
                    "n_cols": "i32", "eps": "fp32",
                }  # fmt: skip
                ln_const = {"HAS_LINEAR_BIAS": True, "HAS_RESIDUAL": True, "BLOCK_H": block}
                jobs.append(
                    (f"layer_norm {dt} BLOCK_H={block} w={cfg.num_warps}",
                     layer_norm._bias_residual_layer_norm_fwd_kernel, ln_sig, ln_const, cfg.num_warps, cfg.num_stages)
                )  # fmt: skip
                emb_sig = {
                    "InputIds": "*i64", "InputsEmbeds": f"*{dt}", "PositionIds": "*i64", "TokenTypeIds": "*i64",
                    "WordEmb": f"*{dt}", "PosEmb": f"*{dt}", "TypeEmb": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}",
                    "Y": f"*{dt}", "stride_inputs_embeds_row": "i32", "stride_word_row": "i32",
                    "stride_pos_row": "i32", "stride_type_row": "i32", "stride_y_row": "i32", "n_cols": "i32",
                    "eps": "fp32",
                }  # fmt: skip
                # input_ids path with token types: the gathers (inputs_embeds is a plain row read).
                emb_const = {"HAS_INPUTS_EMBEDS": False, "HAS_TOKEN_TYPES": True, "BLOCK_H": block}
                jobs.append(
                    (f"embed_layer_norm {dt} BLOCK_H={block} w={cfg.num_warps}",
                     embeddings._embed_layer_norm_fwd_kernel, emb_sig, emb_const, cfg.num_warps, cfg.num_stages)
                )  # fmt: skip
        act_sig = {
            "X": f"*{dt}", "Bias": f"*{dt}", "Y": f"*{dt}", "stride_x_row": "i32", "stride_y_row": "i32",
            "n_rows": "i32", "n_cols": "i32",
        }  # fmt: skip
        for i, cfg in enumerate(activation._bias_act_configs()):
            for act, code in activation._ACT_CODES.items():
                if act != "gelu" and i > 0:
                    continue
                const = {"HAS_BIAS": True, "ACTIVATION": code, **cfg.kwargs}
                jobs.append(
                    (f"bias_act {dt} {act} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w={cfg.num_warps}",
                     activation._bias_act_fwd_kernel, act_sig, const, cfg.num_warps, cfg.num_stages)
                )  # fmt: skip
        for d_pad in HEAD_DIM_BUCKETS:
            head_dim = HEAD_DIM_OF_BUCKET[d_pad]
            assert attention._attention_head_dim_bucket(head_dim) == d_pad
            fp32 = TORCH_DTYPES[dt] == "float32"
            att_sig = {
                "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Out": f"*{dt}", "CuSeqlens": "*i32",
                "stride_q_tok": "i32", "stride_q_head": "i32", "stride_k_tok": "i32", "stride_k_head": "i32",
                "stride_v_tok": "i32", "stride_v_head": "i32", "stride_o_tok": "i32", "stride_o_head": "i32",
                "num_heads": "i32", "qk_scale": "fp32", "seqlen_bucket": "i32",
            }  # fmt: skip
            for cfg in attention._attention_configs(d_pad, fp32):
                const = {
                    "HEAD_DIM": head_dim, "D_PAD": d_pad, "DOT_PRECISION": "ieee" if fp32 else "tf32", **cfg.kwargs
                }  # fmt: skip
                jobs.append(
                    (f"varlen_attention {dt} d={head_dim}(pad {d_pad}) {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} "
                     f"w={cfg.num_warps} s={cfg.num_stages}",
                     attention._varlen_attention_fwd_kernel, att_sig, const, cfg.num_warps, cfg.num_stages)
                )  # fmt: skip
    del torch
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
    for index, (label, fn, signature, constexprs, num_warps, num_stages) in enumerate(jobs):
        if index % num_shards != shard:
            continue
        full_sig = dict(signature)
        for name in constexprs:
            full_sig[name] = "constexpr"
        assert list(full_sig) == [n for n in fn.arg_names if n in full_sig] and len(full_sig) == len(fn.arg_names), (
            f"{label}: signature does not cover the kernel's arguments {fn.arg_names}"
        )
        # Divisibility hints as the JIT derives them for BERT shapes: 16-byte aligned pointers and
        # strides / sizes that are multiples of 16 (hidden 768, 3 * hidden, ...).
        attrs = {
            (fn.arg_names.index(n),): [["tt.divisibility", 16]]
            for n, ty in signature.items()
            if ty.startswith("*") or n.startswith("stride_") or n == "n_cols"
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
    # Shared memory must fit the smaller of the two targets' per-block opt-in limit (A100: 163 KiB).
    too_big = [f"{r['label']} sm_{r['arch']}: {r['shared']} B" for r in records if r["shared"] > 163 * 1024]
    assert not too_big, "shared memory over 163 KiB:\n" + "\n".join(too_big)


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
