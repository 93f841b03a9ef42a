#!/usr/bin/env bash
# clvr-mini stage 2: trajectory SFT of the base on the loop's own steps (edit triplets: accumulated
# prompt + wrong canvas as reference -> repaired canvas) mixed 2:1 with text→image pairs, so the
# model learns multi-reference editing without forgetting to draw. Transformer only (text encoder
# and VAE stay the base's), so θ_sft − θ_base lives in the transformer for the DSWM merge.
# LORA_RANK=16 trains a LoRA on the attention projections instead (fused into the exported folder, so
# the merge still sees a full transformer delta): fewer weights move, so less of the base is overwritten.
# SFT_OUT names the stage's folder (default $W/sft), SFT_LR its peak learning rate (default 5e-5, cosine to 0:
# the issue-17 runs from the annealed base collapsed at a constant 5e-4), PRIOR_WEIGHT the prior preservation
# on the text-to-image examples (regress the frozen base's velocity; default 1, 0 = off).
#   W=clvr_mini_work SFT_STEPS=500 bash scripts/clvr_mini/stage2_sft.sh
set -euo pipefail
W=${W:-clvr_mini_work}
BASE=${BASE:-$W/base}
SFT_STEPS=${SFT_STEPS:-500}
RESUME=${RESUME:-}
SFT_DATA=${SFT_DATA:-$W/data_sft/data.jsonl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$SFT_DATA" ] || python -m clvr_agent.training.clvr_mini_data "$(dirname "$SFT_DATA")" --pairs 1500 --edits 3000 --seed "${SFT_SEED:-2}" \
  --min-size "${MIN_SIZE:-24}" --max-size "${MAX_SIZE:-72}"
SFT_OUT=${SFT_OUT:-$W/sft}
[ -n "$RESUME" ] || rm -rf "$SFT_OUT"
clvr train sft-diffusion --model "$BASE" --data "$SFT_DATA" --out "$SFT_OUT" $RESUME --lora-rank "${LORA_RANK:-0}" \
  --max-steps "$SFT_STEPS" --batch-size 16 --learning-rate "${SFT_LR:-5e-5}" --lr-scheduler cosine --warmup-steps 20 \
  --prior-weight "${PRIOR_WEIGHT:-1}" --max-sequence-length 48 \
  --logit-mean "${LOGIT_MEAN:-0}" \
  --height 64 --width 64 --no-set-bn-stats --log-every 10 --checkpoint-every 100 --keep-checkpoints 1
