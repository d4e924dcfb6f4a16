#!/usr/bin/env bash
# GPU check of the Transformers backend (layer=transformers_moe), in one call on a GPU machine:
#   1. the CPU test suite tests/integrations against the machine's transformers (compatibility: 5.17 there)
#   2. bf16 equality on CUDA: `composer task=check layer=transformers_moe model=hf model.arch=A` for every
#      supported architecture the installed transformers has (logits within 1e-2 of experts_implementation=eager),
#      with kernel=triton, both layer.replace=experts and (where composer knows the router) block
#   3. the bench: prefill of T tokens + one decode step at real per-layer dimensions, composer vs
#      hf eager vs hf grouped_mm, one table per architecture (hf_bench_<arch>.{md,json})
# Outputs under $OUT (default ./hf_gpu_check_out): gpu.txt, versions.txt, pytest_integrations.log,
# check_<arch>_<replace>.log, hf_bench_<arch>.{md,json}, hf_bench.md (all tables).
# Usage (repo root): scripts/hf_gpu_check.sh [tests|check|bench|all] [arch ...]
# BENCH_LAYERS (default 2), BENCH_TOKENS (default 1,16,128,1024,4096), KERNEL (default triton).
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/hf_gpu_check_out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
archs=${*:-qwen3_moe mixtral qwen2_moe olmoe deepseek_v3 gpt_oss}
bench_archs=${*:-qwen3_moe mixtral gpt_oss}
KERNEL=${KERNEL:-triton}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  timeout ${TESTS_TIMEOUT:-600} python3 -m pytest -q tests/integrations -p no:cacheprovider --durations=10 2>&1 \
    | tee "$OUT/pytest_integrations.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
if [[ $what == check || $what == all ]]; then
  for a in $archs; do
    for r in experts block; do
      [[ $r == block && $a == gpt_oss ]] && continue
      timeout ${CHECK_TIMEOUT:-300} python3 -m composer task=check layer=transformers_moe layer.replace=$r model=hf \
        model.arch=$a model.dtype=bfloat16 device=cuda kernel=$KERNEL "hydra.run.dir=$OUT/runs/check_${a}_${r}" \
        > "$OUT/check_${a}_${r}.log" 2>&1
      code=$?
      echo "check $a replace=$r kernel=$KERNEL bf16: exit $code"
      [[ $code == 0 ]] || { rc=1; tail -5 "$OUT/check_${a}_${r}.log"; }
    done
  done
fi
if [[ $what == check || $what == all ]]; then  # torch.compile of the whole swapped model (triton kernel, bf16)
  timeout ${CHECK_TIMEOUT:-300} python3 - > "$OUT/compile_qwen3_moe.log" 2>&1 <<PY
import torch
from composer import load_config
from composer.checking import rel_error
from composer.integrations.transformers_moe import reference_and_swapped
cfg = load_config(None, ["layer=transformers_moe", "model=hf", "model.arch=qwen3_moe", "model.dtype=bfloat16",
                         "device=cuda", "kernel=$KERNEL"])
from composer.integrations.check import _replayed_reference_logits
ref, model = reference_and_swapped(cfg)
ids = torch.randint(3, 128, (1, 64), device="cuda")
compiled = torch.compile(model)

with torch.no_grad():
    got = compiled(ids).logits
    plain = rel_error(got, ref(ids).logits)
    # the reference compiled the same way: its norms and attention fuse as the swapped model's do
    replayed, changed = _replayed_reference_logits(ref, model, ids, run_ref=torch.compile(ref), run_model=compiled)
    err = rel_error(got, replayed)
# like with like, as task=check in bf16: the compiled swapped model against the compiled HF model replaying its
# routing (near-ties may flip); eager HF differs from any compiled bf16 model by the fused norms' rounding
print(f"compiled swapped model vs eager HF: rel. error {plain:.2e}; vs compiled HF replaying its routing {err:.2e} "
      f"({changed} (layer, token) routings differed)")
assert err <= 1e-2, err
PY
  code=$?; echo "compile qwen3_moe bf16: exit $code"; [[ $code == 0 ]] || { rc=1; tail -5 "$OUT/compile_qwen3_moe.log"; }
fi
if [[ $what == bench || $what == all ]]; then
  : > "$OUT/hf_bench.md"
  for a in $bench_archs; do
    timeout ${BENCH_TIMEOUT:-600} python3 -m composer.integrations.bench --arch "$a" --layers ${BENCH_LAYERS:-2} \
      --tokens ${BENCH_TOKENS:-1,16,128,1024,4096} --kernel $KERNEL --out "$OUT" || rc=1
    [[ -f "$OUT/hf_bench_$a.md" ]] && cat "$OUT/hf_bench_$a.md" >> "$OUT/hf_bench.md"
  done
fi
exit $rc
