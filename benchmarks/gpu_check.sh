#!/usr/bin/env bash
# GPU readiness in one command, on a CUDA machine:  make gpu-check   (runbook: benchmarks/GPU.md)
#
# Uses the python that already has a CUDA torch (no venv, no download) and installs this checkout
# into it with `pip install --no-build-isolation --no-deps -e .`. Then, in priority order, each step
# under its own time limit and each writing its results as it goes (a later failure or timeout
# never loses an earlier step's files):
#
#   1. quick test tier   pytest -m gpu_quick tests/ops      every op x dtype at BERT shapes (< 2 min)
#   2. headline bench    BERT-base bf16 32x128 fixed and mixed-length (mixed32), BERT-large bf16 8x384
#   3. ceilings          benchmarks/ceilings.py             GEMM / copy ceilings (many calls per event pair)
#   4. full test tier    pytest -m gpu tests/               (full tier only)
#   5. op micro-benchmarks  pytest benchmarks/              (full tier only)
#   6. benchmark grid    BERT-base, bf16/fp16, batch 1-128, lengths 128/512, fixed/varlen (full tier only)
#   7. summary           benchmarks/gpu_summary.py          MFU, x HF sdpa, x torch.compile (printed last)
#
# Everything goes to benchmarks/results/<gpu-name>/. The whole run is held to GPU_CHECK_TOTAL_S
# seconds (default 540: the GPU machines allow 10 minutes per command).
# Environment: PYTHON (the interpreter to use), GPU_CHECK_TIER (full | quick), GPU_CHECK_TOTAL_S.
set -uo pipefail
cd "$(dirname "$0")/.."
TIER=${GPU_CHECK_TIER:-full}
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
start=$SECONDS
left() { echo $(( TOTAL_S - (SECONDS - start) )); }
# min(a, b), at least 1
cap() { local v=$(( $1 < $2 ? $1 : $2 )); (( v < 1 )) && v=1; echo "$v"; }
# The bench's own budget for starting cells inside a step limit: the rest is for the last cell and writing.
cell_budget() { local b=$(( $1 - 40 )); (( b < $1 / 2 )) && b=$(( $1 / 2 )); echo "$b"; }
declare -A status

# 1. The interpreter: $PYTHON, else the first with a CUDA torch.
PY=""
for c in ${PYTHON:-} python3 python .venv/bin/python; do
    if command -v "$c" >/dev/null 2>&1 && timeout 120 "$c" -c \
        "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=$c
        break
    fi
done
if [[ -z $PY ]]; then
    echo "gpu_check: no python with a CUDA torch and a visible GPU (tried: ${PYTHON:-} python3 python .venv/bin/python)." >&2
    echo "gpu_check: set PYTHON=/path/to/python, or build a venv with a CUDA torch: make setup TORCH_SPEC=..." >&2
    exit 2
fi
name=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9_.-]+', '_', torch.cuda.get_device_name(0)))")
out="benchmarks/results/$name"
mkdir -p "$out"
echo "gpu_check: $PY ($("$PY" -c 'import torch; print(torch.__version__)')), writing into $out, tier $TIER, budget ${TOTAL_S}s"

# 2. This checkout, installed into that python (editable; the C++/CUDA extension built when it can be).
here_ok() { "$PY" -c "import os, sys, bert_fast, bert_fast.kernels; \
sys.exit(0 if os.path.samefile(os.path.dirname(bert_fast.__file__), 'bert_fast') else 1)" 2>/dev/null; }
if ! here_ok || [[ ${GPU_CHECK_REINSTALL:-0} == 1 ]]; then
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if ! timeout "$(cap 240 "$(left)")" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1; then
        echo "gpu_check: install with the extension failed or ran out of time (see $out/install.log); without it" | tee -a "$out/install.log"
        BERT_FAST_BUILD_CPP=0 timeout 120 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$out/install.log" 2>&1
    fi
fi
if ! here_ok; then
    echo "gpu_check: bert_fast from this checkout does not import in $PY (see $out/install.log)" >&2
    exit 3
fi
"$PY" -c "import torch, bert_fast.kernels._backend as b; print('gpu_check: C++ extension', \
'with CUDA kernels' if b.cpp_usable(torch.device('cuda')) else ('CPU only' if b.cpp_usable(torch.device('cpu')) \
else 'not built'))" 2>/dev/null | tee "$out/extension.txt"

run_step() {  # run_step NAME LIMIT_S LOG CMD...: time-bounded, output teed to LOG, status recorded
    local step=$1 limit=$2 log=$3; shift 3
    if (( limit < 10 )); then
        echo "gpu_check: $step skipped (time budget spent)" | tee "$log"; status[$step]=skipped; return
    fi
    echo "gpu_check: $step (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    status[$step]=$rc
    (( rc == 124 || rc == 137 )) && echo "gpu_check: $step stopped at its ${limit}s limit" | tee -a "$log"
}

# 3. Quick test tier.
run_step tests_quick "$(cap 120 "$(( $(left) - 60 ))")" "$out/pytest_quick.log" \
    "$PY" -m pytest -m gpu_quick tests/ops -q -rs -p no:cacheprovider --junitxml="$out/pytest_quick.xml"

if [[ $TIER != quick ]]; then
    # 4. Headline cells: each run writes its JSON after every cell.
    common=(--device cuda --dtypes bf16
            --providers bert_fast,bert_fast-cpp,bert_fast-graphs,hf-sdpa,hf-sdpa-compile,linear-floor
            --repeats 20 --warmup 3 --no-progress --no-plot --out "$out")
    lim=$(cap 150 "$(( $(left) * 6 / 10 ))")
    run_step headline_base "$lim" "$out/headline_base.log" "$PY" -m bert_fast bench --model base \
        --batch-sizes 32 --seq-lens 128 --profiles fixed,mixed32 --time-budget "$(cell_budget "$lim")" \
        --name headline_base "${common[@]}"
    lim=$(cap 120 "$(( $(left) - 60 ))")
    run_step headline_large "$lim" "$out/headline_large.log" "$PY" -m bert_fast bench --model large \
        --batch-sizes 8 --seq-lens 384 --profiles fixed --time-budget "$(cell_budget "$lim")" \
        --name headline_large "${common[@]}"

    # 5. Ceilings.
    run_step ceilings "$(cap 75 "$(( $(left) - 20 ))")" "$out/ceilings.log" \
        "$PY" benchmarks/ceilings.py --out "$out/ceilings.json" --time-budget 45
fi

if [[ $TIER == full ]]; then
    # 6. Full test tier, micro-benchmarks and the grid, with what is left.
    run_step tests_full "$(cap 180 "$(( $(left) - 150 ))")" "$out/pytest_gpu.log" \
        "$PY" -m pytest -m gpu tests/ -q -rs -p no:cacheprovider --junitxml="$out/pytest_gpu.xml"
    run_step microbench "$(cap 90 "$(( $(left) - 90 ))")" "$out/microbench.log" \
        "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$out/microbench.json"
    lim=$(( $(left) - 20 ))
    run_step grid "$lim" "$out/bench.log" "$PY" -m bert_fast bench --model base --device cuda --dtypes bf16,fp16 \
        --batch-sizes 1,32,8,128 --seq-lens 128,512 --profiles fixed,varlen --repeats 10 --warmup 2 \
        --providers bert_fast,bert_fast-triton,bert_fast-cpp,bert_fast-graphs,hf-sdpa,hf-sdpa-compile,onnxruntime,linear-floor \
        --compile-dynamic true --time-budget "$(cell_budget "$lim")" --out "$out" --no-progress
fi

# 7. Summary (reads what was written, even by steps that stopped early).
"$PY" benchmarks/gpu_summary.py "$out" | tee "$out/summary.md"
line="gpu_check: $(( SECONDS - start )) s;"
for k in "${!status[@]}"; do line+=" $k=${status[$k]}"; done
echo "$line; results in $out" | tee -a "$out/summary.md"
[[ ${status[tests_quick]:-1} == 0 ]]
