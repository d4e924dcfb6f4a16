#!/usr/bin/env bash
# The quantized experts' benchmark on one GPU (issue 4's bars), in one call:
#   1. optional: TUNE="int4_w4a16 fp8_w8a8" (or int8_w8a16) retunes those methods' T = 1 decode tiles at the three
#      shapes, their small-T keys, and their expert-sorted keys from T = 16 up (the fastest of the bf16 tile, the
#      shipped tile and, for int4, the INT4_QPAIRS and INT4_PAIRS blocks, for int8_w8a16 a 64-row SWAP_AB block:
#      tune.sorted_entries)
#      (composer.kernels.triton.tune.tune_quant_tables: the tl.dot decode and the GEMV decode; TUNE_DOT=0 times
#      the shipped tl.dot entry instead of searching it again, TUNE_DOT=skip tunes the GEMV decode only) into $OUT/configs, which the benches then use
#      (COMPOSER_KERNEL_CONFIGS); copy the files into composer/kernels/configs/ to ship them. TUNE_TIMEOUT (default
#      450 s) bounds it: GEMV-only int4 tuning took 78-90 s per shape on an H200 (ninth session).
#   2. `composer task=bench` (standalone driver) per shape for fp8_w8a8 per_token_channel (FP8_TOKENS, default
#      1,16,128), int4_w4a16 group 128 (INT4_TOKENS, default 1,16) and int8_w8a16 (INT8_TOKENS, default 1,16,128):
#      composer quantized vs composer bf16 in the same run, torch._scaled_grouped_mm for fp8. An empty *_TOKENS
#      skips that method.
#   3. optional: READ_FLOOR=1 adds scripts/decode_probe.py --read-floor at T = 1 for both methods: each shipped call
#      beside its weights read alone, bf16 and quantized, one read-only launch per GEMM (what two launches cannot
#      go below; docs/performance.md, eleventh session).
# Outputs under $OUT (default ./quant_gpu_bench_out): tune.log, configs/*.json, bench_<shape>_<method>.{md,json}
# with a bench_<shape>_<fp8|int4|int8>.log each, read_floor_<method>.log.
# Usage (repo root): scripts/quant_gpu_bench.sh [shape ...]   (default: mixtral_8x7b qwen3_30b_a3b deepseek_v3)
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
OUT=${OUT:-$PWD/quant_gpu_bench_out}
mkdir -p "$OUT"
shapes=${*:-mixtral_8x7b qwen3_30b_a3b deepseek_v3}
rc=0
if [[ -n ${TUNE:-} ]]; then
  methods=$(python3 -c "import sys; print(tuple(sys.argv[1:]))" $TUNE)
  timeout "${TUNE_TIMEOUT:-450}" python3 -c "from composer.kernels.triton.tune import tune_quant_tables as t; t('$OUT/configs', methods=$methods, dot={'0': False, 'skip': None}.get('${TUNE_DOT:-1}', True))" \
    > "$OUT/tune.log" 2>&1 || rc=1
  tail -n 20 "$OUT/tune.log"
  mkdir -p "$OUT/configs"  # (a failed tune leaves none; the benches then use the shipped tables)
  export COMPOSER_KERNEL_CONFIGS=$OUT/configs
fi
for s in $shapes; do
  [[ ${FP8_TOKENS-1,16,128} ]] && { timeout "${BENCH_TIMEOUT:-300}" python3 -c "from composer.tasks.bench import _main; _main()" \
    --model "$s" --out "$OUT" --tokens "${FP8_TOKENS:-1,16,128}" --quant fp8_w8a8 \
    --quant-params '{"granularity": "per_token_channel"}' > "$OUT/bench_${s}_fp8.log" 2>&1 || rc=1; }
  [[ ${INT4_TOKENS-1,16} ]] && { timeout "${BENCH_TIMEOUT:-300}" python3 -c "from composer.tasks.bench import _main; _main()" \
    --model "$s" --out "$OUT" --tokens "${INT4_TOKENS:-1,16}" --quant int4_w4a16 --quant-params '{"group_size": 128}' \
    > "$OUT/bench_${s}_int4.log" 2>&1 || rc=1; }
  [[ ${INT8_TOKENS-1,16,128} ]] && { timeout "${BENCH_TIMEOUT:-300}" python3 -c "from composer.tasks.bench import _main; _main()" \
    --model "$s" --out "$OUT" --tokens "${INT8_TOKENS:-1,16,128}" --quant int8_w8a16 > "$OUT/bench_${s}_int8.log" 2>&1 || rc=1; }
done
for f in "$OUT"/bench_*.md; do [[ -f $f ]] && { echo "== $f"; grep "^|" "$f"; }; done
if [[ ${READ_FLOOR:-0} == 1 ]]; then
  for m in int4_w4a16 fp8_w8a8; do
    timeout "${BENCH_TIMEOUT:-300}" python3 scripts/decode_probe.py --method "$m" --shapes "$(echo $shapes | tr ' ' ,)" \
      --rounds 2 --read-floor > "$OUT/read_floor_$m.log" 2>&1 || rc=1
    grep -v -i warn "$OUT/read_floor_$m.log" | cut -c1-200
  done
fi
exit $rc
