#!/usr/bin/env bash
# Device-machine driver for the inference, kernel and AWQ benchmarks (one GPU).
# Usage: bash bench/run_gpu_benches.sh infer|kernels|awq|demo [SEED [mpo demo options...]]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
case "$1" in
  infer)
    timeout 150 python3 -m pytest tests/gpu/test_infer_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    timeout 400 python3 bench/bench_infer.py --reps 2 --out "$OUT/bench_infer.json" 2>&1 | tee "$OUT/bench_infer.log" | tail -40
    ;;
  kernels)
    timeout 240 python3 -m pytest tests/gpu/test_kernels_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_kernel_tests.txt"
    timeout 200 python3 bench/bench_kernels.py --out "$OUT/bench_kernels_h100.json" 2>&1 | tail -30
    timeout 100 python3 bench/chain_decode_linears.py --ms 1,8 --out "$OUT/chain_decode_linears_h100.json" 2>&1 | tail -14
    timeout 120 python3 bench/profile_decode.py --engine awq --out "$OUT/profile_decode_awq_h100.json" 2>&1 | tail -12
    ;;
  demo)
    # `mpo demo` on one GPU (the issue's target: <= 3 minutes); report files come back under $OUT.
    timeout 560 python3 -m mpo.demo --device cuda --output-dir /tmp/demo_gpu --overwrite --seed "${2:-0}" "${@:3}" 2>&1 | tail -25
    cp /tmp/demo_gpu/report.json "$OUT/demo_report_gpu.json"; cp /tmp/demo_gpu/report.md "$OUT/demo_report_gpu.md"
    cp /tmp/demo_gpu/sft/metrics.jsonl "$OUT/demo_sft_metrics.jsonl"; cp /tmp/demo_gpu/mpo/metrics.jsonl "$OUT/demo_mpo_metrics.jsonl"
    ;;
  awq)
    timeout 560 python3 bench/bench_awq.py --out "$OUT/bench_awq.json" 2>&1 | tee "$OUT/bench_awq.log" | tail -40
    ;;
esac
