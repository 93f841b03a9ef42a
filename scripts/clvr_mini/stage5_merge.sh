#!/usr/bin/env bash
# clvr-mini stage 5: DSWM — W = W_base + λa·(W_sft+pprl − W_base) + λd·(W_distilled − W_base) on the
# transformer (`clvr merge`; text encoder and VAE are the base's in all three), assembled into a
# 4-step (is_distilled) diffusers folder from the distilled one.
#   W=clvr_mini_work bash scripts/clvr_mini/stage5_merge.sh [ALIGNED_DIR]
set -euo pipefail
W=${W:-clvr_mini_work}
BASE=${BASE:-$W/base}
ALIGNED=${1:-$W/pprl}
DISTILLED=${DISTILLED:-$W/distill}
OUT=${OUT:-$W/merged}
rm -rf "$OUT" "$OUT.transformer"
clvr merge --base "$BASE/transformer" --aligned "$ALIGNED/transformer" --distilled "$DISTILLED/transformer" \
  --out "$OUT.transformer" --lambda-align "${LAMBDA_ALIGN:-1.0}" --lambda-distill "${LAMBDA_DISTILL:-1.0}"
mkdir -p "$OUT"
for part in model_index.json scheduler text_encoder tokenizer vae; do cp -r "$DISTILLED/$part" "$OUT/"; done
mkdir -p "$OUT/transformer"
cp "$OUT.transformer"/*.safetensors "$OUT.transformer"/*.json "$OUT/transformer/"
mv "$OUT/transformer/merge_report.json" "$OUT/merge_report.json"
rm -rf "$OUT.transformer"
