#!/usr/bin/env bash
# clvr-mini-vlm's training stage on one lent accelerator, in at most 9 minutes (not yet run on one).
#
# The CPU run (README, "A learned controller") stopped where its core-hours did; this is the same recipe
# with more data and more steps: the data engine on 16 CPU shards (about 2 min), the word-level init,
# `clvr train sft-vlm` on the GPU under a hard 5-minute timeout (the newest checkpoint is what ships),
# then `clvr eval controller` on 300 held-out prompts. Everything runs offline (nothing is downloaded).
#
# Usage: bash scripts/clvr_mini/gpu_vlm.sh [WORK_DIR]   (results: WORK_DIR/eval/table.md, WORK_DIR/ship)
set -euo pipefail
W=${1:-/tmp/clvr_vlm}
SHARDS=${SHARDS:-8}
export OMP_NUM_THREADS=1
mkdir -p "$W"
t0=$(date +%s)
for k in $(seq 0 $((SHARDS - 1))); do
  timeout 150 clvr synth --out "$W/data/tiers" --n 6000 --seed 1 --prompts tiers --max-tier 8 --record-calls \
    --shard "$k/$SHARDS" --no-progress > "$W/synth-tiers-$k.log" 2>&1 &
  timeout 150 clvr synth --out "$W/data/geneval" --n 6000 --seed 2 --prompts geneval --record-calls \
    --shard "$k/$SHARDS" --no-progress > "$W/synth-geneval-$k.log" 2>&1 &
done
wait || true  # a shard stopped by its timeout keeps every prompt it finished
python scripts/clvr_mini/plan_calls.py "$W/data/plans" --n 20000 --seed 11 --prompts tiers
python scripts/clvr_mini/plan_calls.py "$W/data/plans" --n 6000 --seed 12 --prompts geneval
echo "data: $(cat "$W"/data/*/calls-*.jsonl | wc -l) calls after $(( $(date +%s) - t0 )) s"
python scripts/clvr_mini/init_vlm.py "$W/init" --data "$W/data" --sample 4000 --hidden 128 --layers 4 \
  --intermediate 384 --image-size 128
timeout 300 clvr train sft-vlm --data "$W/data" --model "$W/init" --out "$W/run" --train-vision \
  --max-steps 20000 --batch-size 32 --learning-rate 2e-3 --image-size 128 --checkpoint-every 100 \
  --max-length 4096 --mixed-precision bf16 --seed 0 || true
ckpt=$(ls -d "$W"/run/checkpoints/step-* | tail -1)
python scripts/clvr_mini/ship_vlm.py "$W/init" "$ckpt" "$W/ship" --note "gpu_vlm.sh"
echo "trained to $ckpt after $(( $(date +%s) - t0 )) s"
timeout 90 clvr eval controller --vlm "$W/ship" --device cuda --n 300 --calls-n 40 --out "$W/eval" --overwrite || true
cat "$W/eval/table.md" 2>/dev/null || echo "eval did not finish in its 90 s; rerun it on a CPU with --vlm $W/ship"
