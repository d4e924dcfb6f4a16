#!/usr/bin/env bash
# Expert parallelism on one host with 2 GPUs (NCCL; NVLink multicast off: NCCL_NVLS_ENABLE=0).
#   1. task=check for every all2all backend at the qwen3_30b_a3b shape (num_layers=1), T in {16, 1024} per rank:
#      EP vs the single-rank layer on the same inputs and vs the float64 oracle (exit code 1 on failure).
#   2. the same for every experts kernel (triton, grouped_mm, torch) with all2all=all_to_all, T=16.
#   3. the all2all bench (dispatch / compute / combine ms, bytes per rank, bus bandwidth, single-GPU time).
# Outputs under $OUT (default ./ep_gpu_check_out): gpu.txt, check_*.log + check_*/results.json,
# bench_<backend>.{json,log}, summary.md (the tables for docs/performance.md).
# Usage (repo root): scripts/ep_gpu_check.sh [check|bench|all]    NPROC=2 STEP_TIMEOUT=600 by default.
# On a machine without hydra/omegaconf/pydantic, carry their wheels in .whl/ (../shared/tools/device-wheels.sh).
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/ep_gpu_check_out}
mkdir -p "$OUT"
what=${1:-all}
NPROC=${NPROC:-2}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
TR=(python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
MODEL=(model=qwen3_30b_a3b model.num_layers=1 device=cuda parallel.ep_size="$NPROC")
BACKENDS=(naive allgather_reducescatter all_to_all)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0

check() {  # name, overrides...
  local name=$1; shift
  timeout "$STEP_TIMEOUT" "${TR[@]}" -m composer "${MODEL[@]}" task=check "$@" hydra.run.dir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  local r=$?
  [[ $r -ne 0 ]] && rc=1
  python3 - "$OUT/$name/results.json" "$name" "$r" <<'PY'
import json, sys
path, name, code = sys.argv[1:]
try:
    d = json.load(open(path))
except OSError:
    print(f"{name}: exit {code}, no results.json (see {name}.log)"); sys.exit()
m = d.get("metrics") or {}
ep = max((s.get("ep_vs_single_rel_err", float("nan")) for s in m.get("layers", {}).values()), default=float("nan"))
print(f"{name}: {d['status']} exit {code}; output vs float64 oracle {m.get('output_rel_err')}, "
      f"EP vs single-rank layer {ep}, time {m.get('time_ms')} ms" + (f"\n  {d['error']}" if d.get("error") else ""))
PY
}

if [[ $what == check || $what == all ]]; then
  for b in "${BACKENDS[@]}"; do
    for t in 16 1024; do check "check_${b}_T$t" all2all="$b" task.tokens="$t"; done
  done
  for k in triton grouped_mm torch; do check "check_all_to_all_${k}_T16" all2all=all_to_all kernel="$k" task.tokens=16; done
  check "check_all_to_all_round_robin_T1024" all2all=all_to_all parallel.placement=round_robin task.tokens=1024
fi | tee "$OUT/check_summary.txt"
grep -q "exit [1-9]\|no results" "$OUT/check_summary.txt" 2>/dev/null && rc=1

if [[ $what == bench || $what == all ]]; then
  for b in "${BACKENDS[@]}"; do
    timeout "$STEP_TIMEOUT" "${TR[@]}" -m composer.distributed.bench --tokens 16,1024 --iters 30 --warmup 5 \
      --out "$OUT/bench_$b.json" "${MODEL[@]}" all2all="$b" > "$OUT/bench_$b.log" 2>&1 || rc=1
    tail -n 8 "$OUT/bench_$b.log"
  done
  python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import glob, json, sys
rows = [r for f in sorted(glob.glob(f"{sys.argv[1]}/bench_*.json")) for r in json.load(open(f))]
if rows:
    print(f"EP all2all bench, {rows[0]['model']} (1 layer), ep_size={rows[0]['ep_size']}, {rows[0]['dtype']}, "
          f"kernel={rows[0]['kernel']}, card: {rows[0]['device']}. Times: median over iterations, max over ranks.\n")
    cols = ["all2all", "tokens_per_rank", "dispatch_ms", "compute_ms", "combine_ms", "ep_total_ms", "single_rank_ms",
            "bytes_per_rank", "dispatch_busbw_GBps", "combine_busbw_GBps", "rel_err_vs_single"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    fmt = lambda c, v: f"{v:.3f}" if isinstance(v, float) and not c.startswith("rel") else f"{v:.1e}" if isinstance(v, float) else str(v)
    for r in rows:
        print("| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |")
PY
fi
exit $rc
