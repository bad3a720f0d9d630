#!/usr/bin/env bash
# Where the demo's GPU time goes: cProfile of its SFT stage (300 steps), of pair building (200
# questions) and of MPO (150 steps) on the demo model, top functions by own and cumulative time
# written under $OUT.
# Usage (device machine, after the wheels are installed as in run_gpu_benches.sh):
#   bash bench/profile_demo_stages.sh [cuda|cpu] [sft,pairs,mpo]
# SFT_MODEL=DIR profiles pairs (and MPO) from a trained model instead of this script's own SFT run.
set -uo pipefail
DEVICE=${1:-cuda}
WHICH=${2:-sft,pairs,mpo}
W=/tmp/profile_demo
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
python3 -m data_pipeline.synthetic "$W/task" --seed 0 --num-train 1000 --num-build 200 --num-test 0 --fixed-options --kinds grid
python3 -m mpo.model.tiny "$W/model" --seed 0 --shape demo --image-size 224
report() {  # report NAME: the top of a profile, by own time and by cumulative time
  python3 - "$W/$1.prof" > "$OUT/profile_$1.txt" <<'PY'
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("tottime").print_stats(30)
stats.sort_stats("cumulative").print_stats(45)
stats.sort_stats("cumulative").print_stats(r"/mpo/|/data_pipeline/|/deepspeed/", 60)  # the repo's work, imports aside
PY
  head -45 "$OUT/profile_$1.txt" | tail -32
}
SFT_MODEL=${SFT_MODEL:-$W/model}  # pairs alone: pass a trained model (a random one never stops)
if [[ ",$WHICH," == *",sft,"* ]]; then
  python3 -m cProfile -o "$W/sft.prof" launch/train.py +exp=demo_sft hydra.run.dir="$W/sft" model.path="$W/model" \
    data.path="$W/task/sft" seed=0 device="$DEVICE" max_steps=300 2>&1 | tail -2
  report sft
  SFT_MODEL="$W/sft/final"
fi
if [[ ",$WHICH," == *",pairs,"* ]]; then
  # Through main() (python -m cProfile -m mpo.build_pairs fails: Hydra's dataclass schema under cProfile's __main__).
  python3 - "$W/pairs.prof" model="$SFT_MODEL" questions="$W/task/questions/build.jsonl" image_root="$W/task" \
    output_dir="$W/pairs" samples_per_question=8 pairs_per_question=4 temperature=0.7 top_k=0 max_new_tokens=128 \
    max_dynamic_patch=1 dropout_ntp.share=0.2 seed=0 device="$DEVICE" system_prompt= progress=false \
    max_batch_rows=256 questions_per_call=32 <<'PY' 2>&1 | tail -3
import cProfile, sys
from mpo.build_pairs import main
cProfile.run("main(sys.argv[2:])", sys.argv[1])
PY
  report pairs
fi
if [[ ",$WHICH," == *",mpo,"* ]]; then
  python3 -m cProfile -o "$W/mpo.prof" launch/train.py +exp=demo_mpo hydra.run.dir="$W/mpo" model.path="$SFT_MODEL" \
    data.path="$W/pairs" seed=0 device="$DEVICE" max_steps=150 2>&1 | tail -2
  report mpo
fi
