#!/usr/bin/env bash
# Every GPU measurement of issue #13 in one run (at most ~8 minutes on an H100-class card), for a
# GPU machine lent for a short time. Results (perf.json, the table, the logs) go to $OUT
# (default hero_out/gpu_check).
#   COMFYUI_PATH=~/comfy/ComfyUI bash benchmarks/gpu_check.sh
# SCALE=small runs the same steps at a tiny size (a check of the script on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-hero_out/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
run() {  # name, time limit (s), perf.py arguments...
  local name=$1 limit=$2; shift 2
  echo "[gpu_check] $name (limit ${limit}s)"
  timeout "$limit" "$PY" benchmarks/perf.py --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "[gpu_check] $name exit $?"
  tail -n 4 "$OUT/$name.log"
}
if [ "${SCALE:-full}" = small ]; then
  run toy 300 --models toy --batch 4 --steps 3 --denoise-steps 2 --encoder-epochs 5
  run sd15 300 --models sd15-tiny --size 64 --batch 4 --steps 3 --denoise-steps 2 --encoder-epochs 5
  run sd15-modes 300 --models sd15-tiny --size 64 --batch 4 --steps 3 --denoise-steps 2 \
    --encoder-epochs 5 --memory-modes micro2,micro8,micro8-checkpointing
  run sdxl 300 --models sdxl-tiny --size 64 --batch 2 --steps 3 --denoise-steps 2 --encoder-epochs 5 \
    --memory-modes micro2-checkpointing
else
  # the limits add up to 8 minutes; on an H100-class card each part takes well under its limit
  # the toy model's round on the GPU
  run toy 45 --models toy --batch 64 --steps 20
  # SD1.5 512x512: a whole round, 64 images x 50 steps, 5 trained timesteps (PPO) / 100 rwr steps,
  # at the default memory settings (micro-batch sized from the free memory)
  run sd15 200 --models sd15 --size 512 --batch 64 --steps 50 --denoise-steps 100 --ppo-timesteps 5
  # SD1.5 512x512, the memory modes of the update (issue #13's reference: micro-batch 2 / 8, and
  # 8 with checkpointing), on a shorter round: the per-image-step ratios and the peaks
  run sd15-modes 120 --models sd15 --size 512 --batch 16 --steps 20 --denoise-steps 10 \
    --ppo-timesteps 5 --encoder-epochs 50 --memory-modes micro2,micro8,micro8-checkpointing
  # SDXL 1024x1024, hero only, as an 8-12 GB card would run it (micro-batch 2, checkpointing):
  # 8 images x 20 steps (the per-step ratios carry to 64 x 50)
  run sdxl 115 --models sdxl --methods hero --size 1024 --batch 8 --steps 20 --denoise-steps 25 \
    --memory-modes micro2-checkpointing
fi
echo "[gpu_check] results in $OUT"
