#!/usr/bin/env bash
# The learned path of clvr-mini on the CPU, from the shipped base to the DSWM merge with its controls
# (issue 17), as run for docs/clvr_mini.md "DSWM on the LoRA SFT and PPRL models, with their controls":
#   edit data → edit SFT (LoRA 16, prior preservation) → 4-step distillation of the base → PPRL with the
#   ShapeWorld proxy teacher → DSWM λ grid (selection seed 10) for the SFT and the PPRL model → the table
#   (`clvr eval table`, n = 120, region draws off): 28-step rows on seed 1, 4-step rows on seeds 1 and 2.
#   X=clvr_mini_learned SFT_SEED=1 bash scripts/clvr_mini/learned_chain.sh
# ≈ 2.5 h on two cores (the script runs its stages one after another; each stage skips when its output
# is there, and every `clvr eval` part is resumable, so a killed chain continues).
set -euo pipefail
X=${X:-clvr_mini_learned}
BASE=${BASE:-tools/models/clvr-mini}
SFT_SEED=${SFT_SEED:-1}
N=${N:-120}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$X"
X=$(cd "$X" && pwd)
data() { [ -f "$X/$1/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$X/$1" "${@:2}"; }

# 1. edit data on the model's own distribution + centred lone objects + prior-only prompts
data edits --pairs 0 --edits 1500 --min-size 56 --max-size 112 --seed 11
data centre --pairs 800 --tier-fraction 0 --tags colors,single_object --centre-single --min-size 96 --max-size 128 --seed 31
data prior --pairs 0 --prior-prompts 1500 --tier-fraction 0 --seed 12
data prior_lone --pairs 0 --prior-prompts 800 --tier-fraction 0 --tags colors,single_object --seed 13
[ -f "$X/edits/mix.jsonl" ] || python scripts/clvr_mini/mix.py "$X" edits edits centre prior prior_lone

# 2. edit SFT as a rank-16 LoRA (fused at export), prior preservation against the adapter switched off
if [ ! -f "$X/sft_lora/model_index.json" ]; then
  clvr train sft-diffusion --model "$BASE" --data "$X/edits/mix.jsonl" --out "$X/sft_lora" --lora-rank 16 \
    --max-steps 800 --batch-size 16 --learning-rate 5e-4 --lr-scheduler cosine --warmup-steps 20 --prior-weight 1 \
    --prior-sample-steps 8 --max-sequence-length 48 --height 64 --width 64 --no-set-bn-stats --log-every 10 \
    --seed "$SFT_SEED"
  cp "$BASE/clvr_canvas.json" "$X/sft_lora/"
fi

# 3. the base distilled to 4 steps without CFG (teacher: 28 steps × the base's CFG 2.5)
data data_t2i --pairs 600 --seed 7
if [ ! -f "$X/distill/model_index.json" ]; then
  W=$X BASE=$BASE GUIDANCE=2.5 DISTILL_STEPS=300 PAIRS_N=128 bash scripts/clvr_mini/stage4_distill.sh
  cp "$BASE/clvr_canvas.json" "$X/distill/"
fi

# 4. PPRL from the SFT model on the loop's own executor calls (region draws left out)
[ -f "$X/synth_pprl/synth_config.json" ] || clvr synth --out "$X/synth_pprl" --n 48 --seed 5 --prompts geneval \
  --backend clvr-mini --model "$X/sft_lora" --max-iterations 4 --record-calls --no-progress
if [ ! -f "$X/pprl/model_index.json" ]; then
  python scripts/clvr_mini/stage3_pprl.py --model "$X/sft_lora" --data "$X/synth_pprl" --out "$X/pprl" \
    --proxy shapeworld --max-steps 40 --heldout-runs 8 --eval-every 10
  cp "$BASE/clvr_canvas.json" "$X/pprl/"
fi

# 5. DSWM: the λ grid {0.5, 0.75, 1, 1.25}² on selection seed 10 (not a table seed) for each aligned model
#    (the SFT model's grid and merge are grid/ and merged, the PPRL model's grid_pprl/ and merged_pprl)
for A in sft_lora pprl; do
  S=$([ "$A" = pprl ] && echo _pprl || true)
  clvr eval dswm-grid --base "$BASE" --aligned "$X/$A" --distilled "$X/distill" --out "$X/grid$S" \
    --n 48 --seeds 10 --max-iterations 6 --no-region-draws
  ln -sfn "$(readlink -f "$X/grid$S/best")" "$X/merged$S"
done

# 6. the tables, all rows' parts in one folder (each part measured once, read back by every spec that names
#    its row): 28-step rows on seed 1, 4-step rows (the DSWM comparisons) on seeds 1 and 2, and the merged
#    models against the aligned ones at their own 28 steps on seed 1
python - "$X" "$BASE" <<'PY'
import json, sys
x, base = sys.argv[1:]
four = {"steps": 4, "guidance": 1}
m = {n: {"name": n, "model": f} for n, f in (("base", base), ("sft_lora", f"{x}/sft_lora"), ("pprl", f"{x}/pprl"),
                                             ("distilled", f"{x}/distill"), ("merged", f"{x}/merged"),
                                             ("merged_pprl", f"{x}/merged_pprl"))}
m["base@4"] = {"name": "base@4", "model": base, **four}
m["sft_lora@4"] = {"name": "sft_lora@4", "model": f"{x}/sft_lora", **four}
m["pprl@4"] = {"name": "pprl@4", "model": f"{x}/pprl", **four}
specs = {
    "spec56": (["base", "sft_lora", "pprl"], [["base", "sft_lora"], ["sft_lora", "pprl"], ["base", "pprl"]]),
    "spec4": (["base@4", "distilled", "sft_lora@4", "merged", "pprl@4", "merged_pprl"],
              [["base@4", "distilled"], ["sft_lora@4", "merged"], ["distilled", "merged"],
               ["pprl@4", "merged_pprl"], ["distilled", "merged_pprl"], ["merged", "merged_pprl"]]),
    "spec_cross": (["sft_lora", "merged", "pprl", "merged_pprl"],
                   [["sft_lora", "merged"], ["pprl", "merged_pprl"]]),
}
for name, (rows, compare) in specs.items():
    json.dump({"rows": [m[r] for r in rows], "compare": compare}, open(f"{x}/{name}.json", "w"), indent=1)
PY
table() {  # table SPEC SEEDS: measure (or read back) its rows, keep its table.{json,md,png} as SPEC.*
  clvr eval table --spec "$X/$1.json" --out "$X/table" --n "$N" --seeds "$2" --max-iterations 6 --no-region-draws
  for ext in json md png; do cp "$X/table/table.$ext" "$X/$1.$ext"; done
}
table spec56 "${SEEDS56:-1}"   # SEEDS56=1,2: the 28-step rows on both seeds too (≈ +1 h)
table spec4 1,2
table spec_cross "${SEEDS56:-1}"
