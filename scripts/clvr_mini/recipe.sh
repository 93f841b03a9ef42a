#!/usr/bin/env bash
# The clvr-mini recipe after the base (stage1_base.sh, then stage1b_focus.sh): the 4-step distillation,
# SFT → PPRL and the DSWM merge, each a `clvr train …` / `clvr merge` run, each measured with
# scripts/clvr_mini/evaluate.py (single step vs the loop on the same prompts, and the single-object
# colour+shape rate) while the next stage trains. Results: $EVAL/<row>/row.json.
#   W=clvr_mini_work BASE=clvr_mini_work/base2 SFT_DATA=clvr_mini_work/data_sft_big/data.jsonl N=60 \
#     bash scripts/clvr_mini/recipe.sh
set -euo pipefail
W=${W:-clvr_mini_work}
BASE=${BASE:-$W/base}
EVAL=${EVAL:-$W/eval}
SFT_DATA=${SFT_DATA:-$W/data_sft/data.jsonl}
N=${N:-30}
ITERS=${ITERS:-4}
# The base's CFG scale (its clvr_canvas.json "guidance", else klein's 4): the distillation teacher and
# PPRL's rollouts draw with it, and every stage folder inherits the base's clvr_canvas.json.
GUIDANCE=${GUIDANCE:-$(python -c "import json,sys; print(json.load(open(sys.argv[1])).get('guidance', 4.0))" \
  "$BASE/clvr_canvas.json" 2>/dev/null || echo 4.0)}
export W BASE GUIDANCE OMP_NUM_THREADS=1
inherit() { [ ! -f "$BASE/clvr_canvas.json" ] || cp "$BASE/clvr_canvas.json" "$1/"; }
ev() {  # ev ROW MODEL [extra args]: evaluate in the background
  local row=$1 model=$2; shift 2
  nohup python scripts/clvr_mini/evaluate.py --model "$model" --row "$row" --out "$EVAL/$row" --n "$N" \
    --max-iterations "$ITERS" "$@" > "$EVAL/$row.log" 2>&1 &
}
mkdir -p "$EVAL"
[ -f "$BASE/model_index.json" ] || { echo "no base folder at $BASE (export it with export_checkpoint.py)" >&2; exit 2; }
[ -n "${SKIP_BASE_EVAL:-}" ] || ev base "$BASE"
bash scripts/clvr_mini/stage4_distill.sh > "$W/stage4.log" 2>&1  # cheap, so first
inherit "$W/distill"
ev distill "$W/distill"
SFT_DATA=$SFT_DATA bash scripts/clvr_mini/stage2_sft.sh > "$W/stage2.log" 2>&1
inherit "$W/sft"
ev sft "$W/sft"
# PPRL's rollout contexts: the loop's own executor calls with the SFT model drawing (region draws are left out)
PPRL_DATA=${PPRL_DATA:-$W/synth_pprl}
[ -f "$PPRL_DATA/synth_config.json" ] || clvr synth --out "$PPRL_DATA" --n "${PPRL_PROMPTS:-48}" --seed 5 --prompts geneval \
  --backend clvr-mini --model "$W/sft" --max-iterations "$ITERS" --record-calls --no-progress > "$W/synth_pprl.log" 2>&1
python scripts/clvr_mini/stage3_pprl.py --model "$W/sft" --data "$PPRL_DATA" --out "$W/pprl" \
  --max-steps "${PPRL_STEPS:-30}" --guidance-scale "$GUIDANCE" > "$W/stage3.log" 2>&1
inherit "$W/pprl"
ev pprl "$W/pprl"
bash scripts/clvr_mini/stage5_merge.sh "$W/pprl" > "$W/stage5.log" 2>&1
inherit "$W/merged"
ev merged "$W/merged" --probe "${PROBE_TIERS:-1,2,3,4,5,6}" --per-tier "${PER_TIER:-5}"
wait
