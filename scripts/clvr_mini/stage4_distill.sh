#!/usr/bin/env bash
# clvr-mini stage 4: distil the base (28 steps × CFG GUIDANCE, default 4 = 56 NFE) into a 4-step,
# guidance-free student of the same layout (`clvr train distill`, trajectory targets), saved with
# is_distilled=True. GUIDANCE is the teacher's CFG scale: the base's own (clvr_canvas.json) is best.
#   W=clvr_mini_work DISTILL_STEPS=400 bash scripts/clvr_mini/stage4_distill.sh
set -euo pipefail
W=${W:-clvr_mini_work}
BASE=${BASE:-$W/base}
DISTILL_STEPS=${DISTILL_STEPS:-400}
RESUME=${RESUME:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
prompts = [json.loads(l)["prompt"] for l in (w / "data_t2i/data.jsonl").read_text().splitlines() if l.strip()]
(w / "distill_prompts.txt").write_text("\n".join(prompts[:512]) + "\n")
PY
clvr train distill --model "$BASE" --prompts "$W/distill_prompts.txt" --out "$W/distill" $RESUME \
  --student-steps 4 --teacher-steps 28 --guidance-scale "${GUIDANCE:-4.0}" --num-pairs "${PAIRS_N:-256}" --batch-size 16 \
  --max-steps "$DISTILL_STEPS" --learning-rate 3e-4 --max-sequence-length 48 --height 64 --width 64 \
  --checkpoint-every 100 --keep-checkpoints 1
