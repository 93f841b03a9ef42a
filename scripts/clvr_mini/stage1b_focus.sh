#!/usr/bin/env bash
# clvr-mini stage 1b: the base's second phase. Stage 1 (VAE + text encoder + transformer jointly) gives
# clean canvases but a transformer that mostly ignores the text; this phase freezes the VAE (its latents
# stop moving under the transformer) and, unless TRAIN_TE=1, the text encoder (its word features already
# differ by colour and shape), and trains the transformer at batch 32 on a mix weighted toward the single-
# and two-object tags: 4,000 pairs over colors / single_object / two_object / color_attr + stage 1's 5,000.
# Freezing also makes a step ~2× cheaper. Resumable with RESUME=--resume; export a checkpoint with
#   python scripts/clvr_mini/export_checkpoint.py --start $START --run $W/base2 --out $W/base
#   W=clvr_mini_work START=clvr_agent/models/clvr-mini STEPS=20000 bash scripts/clvr_mini/stage1b_focus.sh
set -euo pipefail
W=${W:-clvr_mini_work}
START=${START:-clvr_agent/models/clvr-mini}
OUT=${OUT:-$W/base2}
STEPS=${STEPS:-20000}
LR=${LR:-1e-3}
RESUME=${RESUME:-}
TE=()
[ "${TRAIN_TE:-0}" = 1 ] && TE=(--train-text-encoder)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$W/data_t2i/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/data_t2i" --pairs 5000 --seed 0
[ -f "$W/data_focus/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/data_focus" --pairs 4000 \
  --tier-fraction 0 --tags colors,single_object,two_object,color_attr --seed 5
python - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
focus = (w / "data_focus/data.jsonl").read_text().splitlines()
t2i = [json.loads(l) for l in (w / "data_t2i/data.jsonl").read_text().splitlines() if l.strip()]
moved = [json.dumps({**r, "target": "../data_t2i/" + r["target"]}) for r in t2i]
(w / "data_focus/mix.jsonl").write_text("\n".join(focus + moved) + "\n")
PY
clvr train sft-diffusion --model "$START" --data "$W/data_focus/mix.jsonl" --out "$OUT" $RESUME "${TE[@]}" \
  --max-steps "$STEPS" --batch-size 32 --learning-rate "$LR" --warmup-steps 50 --no-set-bn-stats \
  --max-sequence-length 48 --height 64 --width 64 --log-every 10 --checkpoint-every 250 --keep-checkpoints 2
