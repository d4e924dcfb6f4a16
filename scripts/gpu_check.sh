#!/usr/bin/env bash
# The whole GPU check of the experts kernels, in one call on a GPU machine (the task=bench protocol: README.md):
#   1. pytest -m gpu on tests/kernels and tests/tasks (bf16/fp16 at the benchmark shapes, compile + CUDA graphs, grouped_mm,
#      and the quantized Triton kernels: every quant method at the three shapes vs kernel=torch)
#   2. the benchmark protocol for mixtral_8x7b, qwen3_30b_a3b and deepseek_v3 (JSON + markdown)
# Outputs go under $OUT (default ./gpu_check_out): gpu.txt, pytest_gpu.log, bench_<model>.{json,md}.
# TESTS_TIMEOUT / BENCH_TIMEOUT (seconds) bound each step; BENCH_ARGS adds options (e.g. --tokens 1,16).
# TESTS picks the test paths (default: tests/kernels tests/tasks). The whole set takes longer than one 10-minute device
# call, so run it a file at a time there, e.g. TESTS=tests/kernels/test_triton_quant.py scripts/gpu_check.sh tests
# Usage (repo root): scripts/gpu_check.sh [tests|bench|all] [model ...]
# Quantized rows: BENCH_ARGS='--quant fp8_w8a8 --quant-params {"granularity":"per_token_channel"}' scripts/gpu_check.sh bench
# On a machine without hydra/omegaconf/pydantic, carry their wheels in .whl/ (../shared/tools/device-wheels.sh).
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
models=${*:-mixtral_8x7b qwen3_30b_a3b deepseek_v3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  timeout ${TESTS_TIMEOUT:-1800} python3 -m pytest -q -m gpu ${TESTS:-tests/kernels tests/tasks} -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest_gpu.log"
  rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  for m in $models; do
    timeout ${BENCH_TIMEOUT:-1800} python3 -c "from composer.tasks.bench import _main; _main()" --model "$m" --out "$OUT" ${BENCH_ARGS:-} \
      || rc=1
  done
fi
exit $rc
