#!/usr/bin/env bash
# One prepared accelerator run (≤ 10 min) that continues the clvr-mini base where the CPU run stopped:
# the same `clvr train sft-diffusion` stage, batch 128, from the shipped folder, then exported to
# $OUT/base (ship it with scripts/clvr_mini/ship.sh $OUT/base). The pairs are regenerated there
# (~3 CPU-minutes, seeded: the same 5,000 as here); clvr_mini_work/ is git-ignored and too big to carry.
#   OUT=/tmp/out STEPS=6000 bash scripts/clvr_mini/gpu_base.sh
set -euo pipefail
W=${W:-clvr_mini_work}
OUT=${OUT:-$W/gpu}
STEPS=${STEPS:-6000}
[ -f "$W/data_t2i/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/data_t2i" --pairs 5000 --seed 0
START=$(python -c "from clvr_agent.tools.flux2_klein import clvr_mini_path; print(clvr_mini_path())")
timeout "${LIMIT_S:-540}" clvr train sft-diffusion --model "$START" --data "$W/data_t2i/data.jsonl" --out "$OUT/base" \
  --max-steps "$STEPS" --batch-size 128 --learning-rate 1e-3 --lr-scheduler cosine --warmup-steps 100 \
  --train-vae --train-text-encoder --no-set-bn-stats --max-sequence-length 48 --height 64 --width 64 \
  --log-every 50 --checkpoint-every 500 --keep-checkpoints 1 || true
[ -f "$OUT/base/model_index.json" ] || python scripts/clvr_mini/export_checkpoint.py --start "$START" --run "$OUT/base" --out "$OUT/base-export"
