#!/usr/bin/env bash
# One prepared accelerator run (≤ 10 min) that continues the clvr-mini base where the CPU run stopped:
# stage 1b's last phase (transformer only; VAE and text encoder frozen; large-object mix;
# σ ~ logit-normal(1.5, 1)) through the same `clvr train sft-diffusion`, batch 128, from the shipped
# folder, exported to $OUT/base (ship it with scripts/clvr_mini/ship.sh $OUT/base). The datasets are
# regenerated there by stage1b_focus.sh's seeded commands (a few CPU-minutes on 16 cores); clvr_mini_work/
# is git-ignored and too big to carry.
#   OUT=/tmp/out STEPS=6000 bash scripts/clvr_mini/gpu_base.sh
set -euo pipefail
W=${W:-clvr_mini_work}
OUT=${OUT:-$W/gpu}
STEPS=${STEPS:-6000}
gen() { local d=$1; shift; [ -f "$W/$d/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/$d" "$@" & }
gen data_big_focus --pairs 4000 --tier-fraction 0 --tags colors,single_object,two_object,color_attr --min-size 56 --max-size 112 --seed 11
gen data_big_t2i --pairs 3000 --min-size 56 --max-size 112 --seed 12
gen data_huge --pairs 3000 --tier-fraction 0 --tags colors,single_object,colors,two_object --min-size 96 --max-size 128 --seed 21
wait
python scripts/clvr_mini/mix.py "$W" data_huge data_huge data_huge data_big_focus data_big_t2i
START=$(python -c "from clvr_agent.tools.flux2_klein import clvr_mini_path; print(clvr_mini_path())")
timeout "${LIMIT_S:-540}" clvr train sft-diffusion --model "$START" --data "$W/data_huge/mix.jsonl" --out "$OUT/base" \
  --max-steps "$STEPS" --batch-size 128 --learning-rate 1e-3 --lr-scheduler cosine --warmup-steps 100 \
  --logit-mean 1.5 --no-set-bn-stats --max-sequence-length 48 --height 64 --width 64 \
  --log-every 50 --checkpoint-every 500 --keep-checkpoints 1 || true
[ -f "$OUT/base/model_index.json" ] || python scripts/clvr_mini/export_checkpoint.py --start "$START" --run "$OUT/base" --out "$OUT/base-export"
