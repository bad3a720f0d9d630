#!/usr/bin/env bash
# Device-machine driver for the inference and AWQ benchmarks (one GPU). Usage: bash bench/run_gpu_benches.sh infer|awq
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
case "$1" in
  infer)
    timeout 150 python3 -m pytest tests/gpu/test_infer_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    timeout 400 python3 bench/bench_infer.py --reps 2 --out "$OUT/bench_infer.json" 2>&1 | tee "$OUT/bench_infer.log" | tail -40
    ;;
  awq)
    timeout 560 python3 bench/bench_awq.py --out "$OUT/bench_awq.json" 2>&1 | tee "$OUT/bench_awq.log" | tail -40
    ;;
esac
