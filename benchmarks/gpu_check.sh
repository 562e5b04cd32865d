#!/usr/bin/env bash
# GPU readiness in one command, on a CUDA machine:  bash benchmarks/gpu_check.sh
#
#   1. the gpu-marked test tier:            pytest -m gpu tests/
#   2. the machine's GEMM / copy ceilings:  benchmarks/ceilings.py
#   3. the benchmark grid: BERT-base and BERT-large; fp16, bf16; batch 1, 8, 32, 128;
#      lengths 16..512; fixed and varlen padding; every provider
#
# Everything goes to benchmarks/results/<device-name>/. The whole run is held to about 9 minutes
# (TOTAL_S, default 540): the tests get at most TESTS_S seconds, and benchmark cells not started
# before the remaining budget runs out are reported as "skipped" in the results.
# Environment: PYTHON (default python), TOTAL_S, TESTS_S.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-540}
TESTS_S=${TESTS_S:-180}
start=$SECONDS

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
name=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9_.-]+', '_', torch.cuda.get_device_name(0)))")
out="benchmarks/results/$name"
mkdir -p "$out"
echo "gpu_check: writing into $out"

timeout "$TESTS_S" "$PYTHON" -m pytest -m gpu tests/ -q -rs 2>&1 | tee "$out/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
echo "pytest -m gpu exit status: $tests_rc" | tee -a "$out/pytest_gpu.log"

"$PYTHON" benchmarks/ceilings.py --out "$out/ceilings.json" > /dev/null
ceil_rc=$?

budget=$(( TOTAL_S - (SECONDS - start) - 60 ))  # 60 s kept for the last cells, writing and charts
(( budget < 60 )) && budget=60
"$PYTHON" -m bert_fast bench \
    --model base,large --device cuda --dtypes fp16,bf16 \
    --batch-sizes 1,8,32,128 --seq-lens 16,32,64,128,256,512 --profiles fixed,varlen \
    --repeats 5 --warmup 2 --compile-dynamic true --time-budget "$budget" \
    --out "$out" --no-progress 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests $tests_rc, ceilings $ceil_rc, bench $bench_rc; $(( SECONDS - start )) s; results in $out"
(( tests_rc == 0 && ceil_rc == 0 && bench_rc == 0 ))
