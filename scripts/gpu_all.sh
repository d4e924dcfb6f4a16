#!/usr/bin/env bash
# One call on a host with 2 GPUs that checks every GPU path of composer at a small cost, for a session
# with little device time left. The full per-feature scripts (gpu_check.sh, ep_gpu_check.sh,
# tp_gpu_check.sh, hf_gpu_check.sh, quant_gpu_check.sh) run more cases; this runs one of each:
#   A (in parallel): on both GPUs, EP checks (all_to_all T=16/1024, naive and allgather_reducescatter T=16)
#      then TP checks (triton T=16/1024) at the protocol shapes (1 layer); on GPU 1 meanwhile, the default
#      job on CUDA (kernel=auto), task=check kernel=triton compile=true cuda_graph=true, the Transformers
#      backend's bf16 check per architecture, and quantized task=check on the Triton kernel.
#   B (one at a time, nothing else on the cards): the EP all2all bench, the TP bench, the HF prefill/decode bench.
# Every step writes its log under $OUT; summary.txt lists each step with its exit code. PACK=1 packs $OUT
# into one gpu_all.tgz (for the device tool, which brings back few files).
# Usage: scripts/gpu_all.sh [all|check|bench|single]; `single` runs only the one-GPU checks, on GPU 0.
# HF_ARCHS, QUANT_TOKENS (default 128) choose cases; QUANT_PYTEST=1 adds the quantized kernels' GPU tests.
set -uo pipefail
source "$(dirname "$0")/_env.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
unset TRITON_INTERPRET
OUT=${OUT:-$PWD/gpu_all_out}
mkdir -p "$OUT/runs"
TR=(python3 -m torch.distributed.run --standalone --nproc-per-node 2)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME COMMAND... : run, log, record the exit code
  local name=$1; shift
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-300}" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  [[ $code == 0 ]] || tail -n 6 "$OUT/$name.log" | sed "s/^/  $name| /"
}

pair() {  # checks that use both GPUs, one after another
  local EP=(model=qwen3_30b_a3b model.num_layers=1 device=cuda parallel.ep_size=2 task=check)
  step ep_all_to_all_T16 "${TR[@]}" -m composer "${EP[@]}" all2all=all_to_all task.tokens=16 hydra.run.dir="$OUT/runs/ep1"
  step ep_all_to_all_T1024 "${TR[@]}" -m composer "${EP[@]}" all2all=all_to_all task.tokens=1024 hydra.run.dir="$OUT/runs/ep2"
  step ep_naive_T16 "${TR[@]}" -m composer "${EP[@]}" all2all=naive task.tokens=16 hydra.run.dir="$OUT/runs/ep3"
  step ep_allgather_reducescatter_T16 "${TR[@]}" -m composer "${EP[@]}" all2all=allgather_reducescatter task.tokens=16 hydra.run.dir="$OUT/runs/ep4"
  local TP=(model=mixtral_8x7b model.num_layers=1 device=cuda parallel.tp_size=2 task=check kernel=triton)
  step tp_triton_T16 "${TR[@]}" -m composer "${TP[@]}" task.tokens=16 hydra.run.dir="$OUT/runs/tp1"
  step tp_triton_T1024 "${TR[@]}" -m composer "${TP[@]}" task.tokens=1024 hydra.run.dir="$OUT/runs/tp2"
}

single() {  # single-GPU checks (on GPU 1 beside pair; on GPU 0 with `gpu_all.sh single`)
  export CUDA_VISIBLE_DEVICES=${SINGLE_GPU:-1}
  step default_job python3 -m composer hydra.run.dir="$OUT/runs/default"
  step check_triton_compile_graph python3 -m composer task=check kernel=triton compile=true cuda_graph=true \
    model=qwen3_30b_a3b model.num_layers=2 task.tokens=64 hydra.run.dir="$OUT/runs/compile"
  for a in ${HF_ARCHS:-qwen3_moe mixtral qwen2_moe olmoe deepseek_v3 gpt_oss}; do
    step "hf_check_$a" python3 -m composer task=check layer=transformers_moe model=hf model.arch="$a" \
      model.dtype=bfloat16 device=cuda kernel=triton hydra.run.dir="$OUT/runs/hf_$a"
  done
  local QUANTS=("quant=int8_w8a16" "quant=int8_w8a8" "quant=int4_w4a16" "quant=int4_w4a16 quant.zero_point=true"
    "quant=fp8_w8a8 quant.granularity=per_tensor" "quant=fp8_w8a8 quant.granularity=per_token_channel"
    "quant=fp8_w8a8 quant.granularity=block")
  for q in "${QUANTS[@]}"; do
    for T in ${QUANT_TOKENS:-128}; do
      local tag; tag="quant_check_$(echo "$q" | sed 's/quant=//; s/quant\.//g; s/[ =]/_/g')_T$T"
      # shellcheck disable=SC2086
      step "$tag" python3 -m composer task=check $q kernel=triton model=qwen3_30b_a3b model.num_layers=1 \
        task.tokens="$T" hydra.run.dir="$OUT/runs/$tag"
    done
  done
  if [[ -n ${QUANT_PYTEST:-} ]]; then  # the quantized kernels vs kernel=torch at the three shapes (errors printed)
    STEP_TIMEOUT=${QUANT_PYTEST_TIMEOUT:-600} step quant_pytest python3 -m pytest -q -s -m gpu \
      tests/kernels/test_triton_quant.py -p no:cacheprovider
  fi
}

if [[ ${1:-all} == single ]]; then  # a one-GPU machine: only the single-GPU checks, on GPU 0
  SINGLE_GPU=0 single
elif [[ ${1:-all} != bench ]]; then
  pair & p=$!
  single & s=$!
  wait $p $s
fi
if [[ ${1:-all} != check && ${1:-all} != single ]]; then
  unset CUDA_VISIBLE_DEVICES
  step ep_bench "${TR[@]}" -m composer.distributed.bench --tokens 16,1024 --iters 30 --warmup 5 \
    --out "$OUT/ep_bench.json" model=qwen3_30b_a3b model.num_layers=1 device=cuda parallel.ep_size=2 all2all=all_to_all
  step tp_bench "${TR[@]}" -m composer.distributed.tp_bench --tokens 16,1024 --iters 30 --warmup 5 \
    --out "$OUT/tp_bench.json" model=mixtral_8x7b model.num_layers=1 model.dtype=bfloat16 device=cuda parallel.tp_size=2 kernel=triton
  step hf_bench python3 -m composer.integrations.bench --arch qwen3_moe --layers 2 --tokens 1,16,128,1024,4096 \
    --kernel triton --out "$OUT"
fi
rc=0
grep -q "exit [1-9]" "$OUT/summary.txt" && rc=1
if [[ -n ${PACK:-} ]]; then  # the device tool brings back at most 8 files: pack the rest into one archive
  tar czf /tmp/gpu_all.tgz -C "$OUT" . && rm -rf "$OUT"/* && mv /tmp/gpu_all.tgz "$OUT/gpu_all.tgz"
fi
exit $rc
