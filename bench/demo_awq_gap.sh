#!/usr/bin/env bash
# Where the GPU demo's AWQ − MPO gap comes from (device machine, one GPU): one `mpo demo --device cuda` run,
# a second AWQ export of its MPO model calibrated in fp32 (the CPU demo's setting; the GPU demo calibrates
# in bf16), then the MPO model and both exports evaluated on the held-out split in bf16 and in fp32 on the
# GPU and on the CPU (the reference path, no Triton kernels). Results: $OUT/demo_awq_gap_seed$SEED.json.
# Usage: bash bench/demo_awq_gap.sh SEED
set -uo pipefail
seed=${1:-1}
bash bench/run_gpu_benches.sh demo "$seed" > "$OUT/demo_seed$seed.log" 2>&1
tail -8 "$OUT/demo_seed$seed.log"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
D=/tmp/demo_gpu
python3 -m mpo.export_awq model=$D/mpo/final data=$D/pairs output_dir=$D/awq_fp32 device=cuda dtype=float32 \
    seed="$seed" progress=false calibration.num_samples=64 calibration.system_prompt= > "$OUT/export_fp32.log" 2>&1
models="model={mpo:$D/mpo/final,awq_bf16cal:$D/mpo_awq,awq_fp32cal:$D/awq_fp32}"
bench="benchmarks=['custom:$D/task/eval_items/synthetic.jsonl']"
common="cot=true max_new_tokens=128 batch_size=128 max_batch_rows=256 max_tiles=1 system_prompt= progress=false"
for run in "cuda_bf16 device=cuda" "cuda_fp32 device=cuda dtype=float32" "cpu_fp32 device=cpu"; do
    set -- $run
    name=$1; shift
    python3 -m mpo.evaluate "$models" "$bench" output_dir=$D/gap_$name "$@" $common > "$OUT/eval_$name.log" 2>&1 \
        || { echo "eval $name failed:"; tail -5 "$OUT/eval_$name.log"; }
done
python3 - "$D" "$seed" "$OUT/demo_awq_gap_seed$seed.json" <<'PY'
import json, sys
from pathlib import Path
from mpo.eval.paired import paired_comparison
from mpo.eval.prediction_files import read_predictions
from mpo.eval.scorers import custom_item_values
from mpo.eval.benchmarks import load_benchmark
root, seed, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
items = load_benchmark(f"custom:{root}/task/eval_items/synthetic.jsonl")
result = {"seed": seed, "demo": json.loads((root / "report.json").read_text())["accuracy"], "runs": {}}
for run in ("cuda_bf16", "cuda_fp32", "cpu_fp32"):
    pred_dir = root / f"gap_{run}" / "predictions"
    if not pred_dir.is_dir():
        continue
    values = {m.name: custom_item_values(items, {k: r["prediction"] for k, r in read_predictions(m / "synthetic.jsonl").items()}, cot=True)
              for m in sorted(pred_dir.iterdir()) if (m / "synthetic.jsonl").is_file()}
    acc = {m: round(100 * sum(v.values()) / len(v), 2) for m, v in values.items()}
    paired = {m: paired_comparison(values["mpo"], values[m]) for m in values if m != "mpo" and "mpo" in values}
    result["runs"][run] = {"accuracy": acc, "vs_mpo": paired}
    print(run, acc, {m: (p["first_only"], p["second_only"], round(p["mcnemar_p"], 3)) for m, p in paired.items()})
Path(out).write_text(json.dumps(result, indent=2) + "\n")
PY
