#!/usr/bin/env bash
# The clvr-mini recipe after the base run (stage1_base.sh): export the base, then the 4-step
# distillation, SFT → PPRL and the DSWM merge, each measured with scripts/clvr_mini/evaluate.py (single
# step vs the loop on the same prompts) while the next stage trains. Results: $W/eval/<row>/row.json.
#   W=clvr_mini_work N=30 bash scripts/clvr_mini/recipe.sh
set -euo pipefail
W=${W:-clvr_mini_work}
N=${N:-30}
ITERS=${ITERS:-4}
export W OMP_NUM_THREADS=1
ev() {  # ev ROW MODEL [extra args]: evaluate in the background
  local row=$1 model=$2; shift 2
  nohup python scripts/clvr_mini/evaluate.py --model "$model" --row "$row" --out "$W/eval/$row" --n "$N" \
    --max-iterations "$ITERS" "$@" > "$W/eval_$row.log" 2>&1 &
}
[ -f "$W/base/model_index.json" ] || python scripts/clvr_mini/export_checkpoint.py --start "$W/init" --run "$W/joint" --out "$W/base"
ev base "$W/base"
BASE=$W/base bash scripts/clvr_mini/stage4_distill.sh > "$W/stage4.log" 2>&1  # cheap, so first
ev distill "$W/distill"
BASE=$W/base bash scripts/clvr_mini/stage2_sft.sh > "$W/stage2.log" 2>&1
ev sft "$W/sft"
python scripts/clvr_mini/stage3_pprl.py --model "$W/sft" --data "$W/data_sft/data.jsonl" --out "$W/pprl" \
  --steps "${PPRL_STEPS:-30}" > "$W/stage3.log" 2>&1
ev pprl "$W/pprl"
BASE=$W/base bash scripts/clvr_mini/stage5_merge.sh "$W/pprl" > "$W/stage5.log" 2>&1
ev merged "$W/merged" --probe "${PROBE_TIERS:-1,2,3,4,5,6}" --per-tier "${PER_TIER:-5}"
wait
