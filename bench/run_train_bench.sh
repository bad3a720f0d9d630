#!/usr/bin/env bash
# Runs bench_train.py on the device machine: one GPU (ZeRO-2) and two GPUs (ZeRO-3), both layouts.
# Needs the carried wheels in .whl (deepspeed, hydra-core, omegaconf, antlr4, hjson, pydantic...).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for layout in mpo peer_layout; do
  CUDA_VISIBLE_DEVICES=0 python3 bench/bench_train.py --zero 2 --layout $layout --steps 4 --warmup 2 \
    --out "$OUT/train_1gpu_$layout.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error:" 
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    torchrun --nproc_per_node 2 bench/bench_train.py --zero 3 --layout $layout --steps 4 --warmup 2 \
      --out "$OUT/train_2gpu_$layout.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error:"
  fi
done
