#!/usr/bin/env bash
# One prepared accelerator run (≤ 10 min) that continues the clvr-mini base where the CPU run stopped:
# stage 1b's last phase (transformer only; VAE and text encoder frozen; lone objects at the canvas centre;
# σ ~ logit-normal(1.5, 1), cosine learning rate) through the same `clvr train sft-diffusion`, batch 128,
# from the shipped folder, exported to $OUT/base (ship it with scripts/clvr_mini/ship.sh $OUT/base). The
# dataset is regenerated there by stage1b_focus.sh's seeded command (a CPU-minute); clvr_mini_work/ is
# git-ignored and too big to carry.
#   OUT=/tmp/out STEPS=6000 bash scripts/clvr_mini/gpu_base.sh
set -euo pipefail
W=${W:-clvr_mini_work}
OUT=${OUT:-$W/gpu}
STEPS=${STEPS:-6000}
gen() { local d=$1; shift; [ -f "$W/$d/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/$d" "$@" & }
gen data_centre --pairs 3000 --tier-fraction 0 --tags colors,single_object --centre-single --min-size 96 --max-size 128 --seed 31
wait
START=$(python -c "from clvr_agent.tools.flux2_klein import clvr_mini_path; print(clvr_mini_path())")
timeout "${LIMIT_S:-540}" clvr train sft-diffusion --model "$START" --data "$W/data_centre/data.jsonl" --out "$OUT/base" \
  --max-steps "$STEPS" --batch-size 128 --learning-rate 1e-3 --lr-scheduler cosine --warmup-steps 100 \
  --logit-mean 1.5 --no-set-bn-stats --max-sequence-length 48 --height 64 --width 64 \
  --log-every 50 --checkpoint-every 500 --keep-checkpoints 1 || true
[ -f "$OUT/base/model_index.json" ] || python scripts/clvr_mini/export_checkpoint.py --start "$START" --run "$OUT/base" --out "$OUT/base-export"
