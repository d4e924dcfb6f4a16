#!/usr/bin/env bash
# Tensor-parallel experts on one host with 2 GPUs (NCCL; NVLink multicast off: NCCL_NVLS_ENABLE=0).
#   1. task=check at the mixtral_8x7b shape (bf16, num_layers=1), parallel.tp_size=2, T in {16, 1024}, for every
#      experts kernel (triton, grouped_mm, torch): each rank's TP layer (all-reduced) vs the single-GPU layer built
#      from the same seed on the same inputs (tp_vs_single_rel_err, bf16 tolerance 1e-2) and vs the float64 oracle
#      (exit code 1 on failure). Plus two sharded quant methods (fp8_w8a8 block [128,128], int8_w8a16) at T=16.
#   2. the TP bench (composer.distributed.tp_bench): compute (this rank's slice) and all-reduce times, the layer's
#      forward, the single-GPU experts time on the same card, all-reduce bus bandwidth, TP-vs-single error.
# Outputs under $OUT (default ./tp_gpu_check_out): gpu.txt, check_*.log + check_*/results.json, check_summary.txt,
# bench_<kernel>.{json,md,log}, summary.md (the tables for docs/performance.md).
# Usage (repo root): scripts/tp_gpu_check.sh [check|bench|all]    NPROC=2 STEP_TIMEOUT=600 by default.
# On a machine without hydra/omegaconf/pydantic, carry their wheels in .whl/ (../shared/tools/device-wheels.sh).
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/tp_gpu_check_out}
mkdir -p "$OUT"
what=${1:-all}
NPROC=${NPROC:-2}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
TR=(python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
MODEL=(model=mixtral_8x7b model.num_layers=1 model.dtype=bfloat16 device=cuda parallel.tp_size="$NPROC")
KERNELS=(triton grouped_mm torch)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0

check() {  # name, overrides...
  local name=$1; shift
  timeout "$STEP_TIMEOUT" "${TR[@]}" -m composer "${MODEL[@]}" task=check "$@" hydra.run.dir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  local r=$?
  python3 - "$OUT/$name/results.json" "$name" "$r" <<'PY'
import json, sys
path, name, code = sys.argv[1:]
try:
    d = json.load(open(path))
except OSError:
    print(f"{name}: exit {code}, no results.json (see {name}.log)"); sys.exit()
m = d.get("metrics") or {}
layers = m.get("layers", {}).values()
tp = max((s.get("tp_vs_single_rel_err", s.get("tp_vs_single_rel_err_info", float("nan"))) for s in layers), default=float("nan"))
print(f"{name}: {d['status']} exit {code}; output vs float64 oracle {m.get('output_rel_err')}, "
      f"TP vs single-GPU layer {tp}, tp_size {m.get('tp_size')}, time {m.get('time_ms')} ms"
      + (f"\n  {d['error']}" if d.get("error") else ""))
PY
}

if [[ $what == check || $what == all ]]; then
  for k in "${KERNELS[@]}"; do
    for t in 16 1024; do check "check_${k}_T$t" kernel="$k" task.tokens="$t"; done
  done
  check "check_triton_fp8_block_T16" kernel=triton quant=fp8_w8a8 quant.granularity=block task.tokens=16
  check "check_triton_int8_w8a16_T16" kernel=triton quant=int8_w8a16 task.tokens=16
fi | tee "$OUT/check_summary.txt"
grep -q "exit [1-9]\|no results" "$OUT/check_summary.txt" 2>/dev/null && rc=1

if [[ $what == bench || $what == all ]]; then
  for k in triton grouped_mm; do
    timeout "$STEP_TIMEOUT" "${TR[@]}" -m composer.distributed.tp_bench --tokens 16,1024 --iters 30 --warmup 5 \
      --out "$OUT/bench_$k.json" "${MODEL[@]}" kernel="$k" > "$OUT/bench_$k.log" 2>&1 || rc=1
    tail -n 8 "$OUT/bench_$k.log"
  done
  python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import glob, json, sys
rows = [r for f in sorted(glob.glob(f"{sys.argv[1]}/bench_*.json")) for r in json.load(open(f))]
if rows:
    print(f"Tensor-parallel experts bench, {rows[0]['model']} (1 layer), tp_size={rows[0]['tp_size']}, {rows[0]['dtype']}, "
          f"card: {rows[0]['device']}. Times: median over iterations, max over ranks; single_rank_ms: the whole "
          f"experts layer on one card of the same run.\n")
    cols = ["kernel", "tokens", "compute_ms", "allreduce_ms", "total_ms", "single_rank_ms", "speedup_vs_single",
            "allreduce_bytes", "allreduce_busbw_GBps", "rel_err_vs_single"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    fmt = lambda c, v: f"{v:.3f}" if isinstance(v, float) and not c.startswith("rel") else f"{v:.1e}" if isinstance(v, float) else str(v)
    for r in rows:
        print("| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |")
    bad = [r for r in rows if not r["rel_err_vs_single"] <= 1e-2]
    if bad:
        print(f"\nFAILED: TP vs single-GPU rel. error above 1e-2 in {len(bad)} row(s)"); sys.exit(1)
PY
  [[ ${PIPESTATUS[0]} -ne 0 ]] && rc=1
fi
exit $rc
