#!/usr/bin/env bash
# Every quant method at the three benchmark shapes, T in {1, 128, 4096}: `composer task=check` on the GPU
# (error vs the dequantized and the unquantized float64 oracles; results.json per job under $OUT).
#   KERNEL   experts kernel (default auto: triton, which claims every method; KERNEL=torch for the reference)
#   TOKENS   default "1 128 4096";  SHAPES default "mixtral_8x7b qwen3_30b_a3b deepseek_v3"
#   DS_EXPERTS  deepseek_v3 experts kept (default 64: the float64 oracle dequantizes every expert, 256 would
#               need ~90 GB); the GEMM shapes (H=7168, I=2048) are the benchmark's.
#   METHODS  a regular expression: only the methods below whose overrides match it (default: all), e.g.
#            METHODS=int8_w8a16 or METHODS='fp8.*block'
# Usage (repo root): scripts/quant_gpu_check.sh      Outputs: $OUT (default ./quant_gpu_check_out)/summary.txt
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/quant_gpu_check_out}
KERNEL=${KERNEL:-auto}
TOKENS=${TOKENS:-"1 128 4096"}
SHAPES=${SHAPES:-"mixtral_8x7b qwen3_30b_a3b deepseek_v3"}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
ALL_METHODS=(
  "quant=int8_w8a16"
  "quant=int8_w8a8"
  "quant=int4_w4a16 quant.group_size=128"
  "quant=int4_w4a16 quant.group_size=128 quant.zero_point=true"
  "quant=fp8_w8a8 quant.granularity=per_tensor"
  "quant=fp8_w8a8 quant.granularity=per_token_channel"
  "quant=fp8_w8a8 quant.granularity=block quant.block_shape=[128,128]"
)
rc=0
FILTER=${METHODS:-.}
: > "$OUT/summary.txt"
for shape in $SHAPES; do
  extra="model.num_layers=1"
  [[ $shape == deepseek_v3 ]] && extra="$extra model.num_experts=${DS_EXPERTS:-64}"
  for method in "${ALL_METHODS[@]}"; do
    [[ $method =~ $FILTER ]] || continue
    for T in $TOKENS; do
      tag="${shape}_$(echo "$method" | tr ' =[],' '_____')_T$T"
      dir="$OUT/$tag"
      python3 -m composer task=check model=$shape $extra $method kernel=$KERNEL device=cuda task.tokens=$T \
        hydra.run.dir="$dir" > "$OUT/$tag.log" 2>&1
      code=$?
      [[ $code != 0 ]] && rc=1
      python3 - "$dir/results.json" "$tag" "$code" >> "$OUT/summary.txt" <<'PY'
import json, sys
path, tag, code = sys.argv[1:]
try:
    m = json.load(open(path))["metrics"]
    print(f"{tag:90s} rc={code} dequant={m.get('output_rel_err', float('nan')):.2e} "
          f"unquant={m.get('output_rel_err_unquantized', float('nan')):.2e} bound={m.get('unquantized_bound')} "
          f"time_ms={m.get('time_ms', float('nan')):.2f}")
except Exception as exc:  # no results: see the log
    print(f"{tag:90s} rc={code} no results ({exc})")
PY
      tail -1 "$OUT/summary.txt"
    done
  done
done
exit $rc
