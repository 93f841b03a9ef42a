#!/usr/bin/env bash
# The clvr-mini recipe's long stages on one lent accelerator, in at most 9 minutes (not yet run on one),
# ending in the publishable table's command at small n (issue 17):
#   data (CPU) → SFT with prior preservation on the pixel-consistent edit data ∥ 4-step distillation
#   → the loop's own states with the SFT model drawing (clvr synth --record-calls)
#   → PPRL with the ShapeWorld proxy teacher ∥ the same with --proxy plain (simple RL)
#   → DSWM λ grid (clvr eval dswm-grid, selection seed 10) → clvr eval table (seeds 1, 2).
# Every stage runs under a hard timeout (data ~40 s, SFT ∥ distill 100, synth 45, PPRL 120, grid 120,
# table 60: ~8 min; estimates, not measured); a full fine-tune killed before its end is exported from its
# newest checkpoint so the next stage always has a folder. Table rows are measured one process per row
# while later stages train (each row is its own folder under $T); the last `clvr eval table` reads them
# back (a row part not finished by then is measured there) and writes table.json/md/png and probe.png.
# N and GRID_N scale the measurement to the time left.
#
# Usage: bash scripts/clvr_mini/gpu_recipe.sh [WORK_DIR]   (results: WORK_DIR/table/table.md)
# The full-size table on the same folders, afterwards (CPU hours or a second accelerator run):
#   clvr eval table --spec WORK_DIR/rows.json --out WORK_DIR/table120 --n 120 --seeds 1,2
set -euo pipefail
W=${1:-/tmp/clvr_recipe}
N=${N:-16}                 # table prompts per seed (the publishable table: 120)
GRID_N=${GRID_N:-8}        # λ-grid selection prompts (seed 10, apart from the table's 1, 2)
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE:-$(python -c "from clvr_agent.tools.flux2_klein import clvr_mini_path; print(clvr_mini_path())")}
GUIDANCE=$(python -c "import json,sys; print(json.load(open(sys.argv[1])).get('guidance', 4.0))" "$BASE/clvr_canvas.json")
T=$W/table
export OMP_NUM_THREADS=1
mkdir -p "$W" "$T"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
inherit() { cp "$BASE/clvr_canvas.json" "$1/"; }  # 64 px drawing, 256 px canvases, the base's CFG scale
finish() {  # finish START RUN: a stage killed by its timeout is exported from its newest checkpoint to RUN.final
  [ -f "$2/model_index.json" ] || python "$HERE/export_checkpoint.py" --start "$1" --run "$2" --out "$2.final"
}
folder() { if [ -f "$1/model_index.json" ]; then echo "$1"; else echo "$1.final"; fi; }
rows() {  # rows NAME…: measure each named row of rows.json in its own background process (its own folder in $T)
  for name in "$@"; do
    python -c "import json,sys; s=json.load(open(sys.argv[1])); json.dump({'rows': [r for r in s['rows'] if r['name'] == sys.argv[2]],
      'probe': [p for p in s['probe'] if p == sys.argv[2]]}, open(sys.argv[3], 'w'))" "$W/rows.json" "$name" "$W/rows-$name.json"
    timeout "${ROW_LIMIT_S:-240}" clvr eval table --spec "$W/rows-$name.json" --out "$T" --n "$N" --seeds 1,2 --edits "$N" \
      --per-tier 3 --device cuda > "$W/table-$name.log" 2>&1 &
  done
}

# 0. data on the CPU: pixel-consistent edit examples in the loop's language (+ their text-to-image pairs,
#    on which the prior is applied), centred lone objects (the base's own distribution), distillation prompts
gen() { local d=$1; shift; [ -f "$W/$d/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/$d" "$@" > "$W/$d.log" 2>&1 & }
gen data_edits --pairs 1500 --edits 3000 --min-size 56 --max-size 112 --seed 11
gen data_centre --pairs 1500 --tier-fraction 0 --tags colors,single_object --centre-single --min-size 96 --max-size 128 --seed 31
gen data_prior --pairs 0 --prior-prompts 1500 --tier-fraction 0 --seed 12  # prior-only: the base's own velocity
gen data_prior_lone --pairs 0 --prior-prompts 800 --tier-fraction 0 --tags colors,single_object --seed 13
gen data_t2i --pairs 1000 --seed 7
wait
python "$HERE/mix.py" "$W" data_edits data_edits data_centre data_prior data_prior_lone
python -c "import json,sys; print('\n'.join(json.loads(l)['prompt'] for l in open(sys.argv[1]) if l.strip()))" \
  "$W/data_t2i/data.jsonl" > "$W/distill_prompts.txt"
say "data"

# 1. SFT (prior weight 1, 5e-5 cosine) ∥ distillation of the base (28 × CFG → 4 steps, no CFG)
timeout 100 clvr train sft-diffusion --model "$BASE" --data "$W/data_edits/mix.jsonl" --out "$W/sft" \
  --max-steps 1500 --batch-size 64 --learning-rate 5e-5 --lr-scheduler cosine --warmup-steps 20 --prior-weight 1 \
  --max-sequence-length 48 --height 64 --width 64 --no-set-bn-stats --log-every 50 --checkpoint-every 100 \
  --keep-checkpoints 1 > "$W/sft.log" 2>&1 &
timeout 100 clvr train distill --model "$BASE" --prompts "$W/distill_prompts.txt" --out "$W/distill" \
  --student-steps 4 --teacher-steps 28 --guidance-scale "$GUIDANCE" --num-pairs 1000 --batch-size 64 \
  --max-steps 1500 --learning-rate 3e-4 --max-sequence-length 48 --height 64 --width 64 \
  --checkpoint-every 100 --keep-checkpoints 1 > "$W/distill.log" 2>&1 &
wait || true
finish "$BASE" "$W/sft"; finish "$BASE" "$W/distill"
SFT=$(folder "$W/sft"); DISTILL=$(folder "$W/distill")
inherit "$SFT"; inherit "$DISTILL"
say "sft, distill"

# 2. the loop's own states with the SFT model drawing: PPRL's rollout contexts (region draws left out)
for k in 0 1 2 3; do
  timeout 45 clvr synth --out "$W/synth_pprl" --n 64 --seed 5 --prompts geneval --backend clvr-mini --model "$SFT" \
    --device cuda --max-iterations 4 --record-calls --shard "$k/4" --no-progress > "$W/synth-$k.log" 2>&1 &
done
wait || true
say "synth"

# The table's rows (region draws off unless named -regions), written now so rows can be measured early.
python - "$W/rows.json" "$BASE" "$SFT" "$W/pprl" "$W/pprl_plain" "$DISTILL" "$W/grid/best" <<'PY'
import json, sys
out, base, sft, pprl, plain, distill, merged = sys.argv[1:]
rows = [dict(name="base", model=base), dict(name="base-regions", model=base, region_draws=True),
        dict(name="sft", model=sft), dict(name="pprl", model=pprl), dict(name="simple-rl", model=plain),
        dict(name="pprl-regions", model=pprl, region_draws=True),
        dict(name="base-4nfe", model=base, steps=4, guidance=1.0), dict(name="aligned-4nfe", model=pprl, steps=4, guidance=1.0),
        dict(name="distilled", model=distill), dict(name="merged", model=merged)]
compare = [["base", "sft"], ["sft", "pprl"], ["simple-rl", "pprl"], ["base-regions", "pprl-regions"],
           ["base-4nfe", "distilled"], ["pprl", "merged"], ["aligned-4nfe", "merged"]]
json.dump({"rows": rows, "compare": compare, "probe": ["base", "pprl", "merged"]}, open(out, "w"), indent=1)
PY

# 3. PPRL (ShapeWorld proxy teacher) ∥ simple RL (--proxy plain), from the SFT model; meanwhile the rows
#    that need neither are measured
rows base base-regions sft distilled base-4nfe
pprl_pids=()
for P in shapeworld plain; do
  OUTP=$W/pprl; [ "$P" = shapeworld ] || OUTP=$W/pprl_plain
  timeout 120 python "$HERE/stage3_pprl.py" --model "$SFT" --data "$W/synth_pprl" --out "$OUTP" --proxy "$P" \
    --max-steps 200 --heldout-runs 12 --eval-every 25 --guidance-scale "$GUIDANCE" > "$W/pprl-$P.log" 2>&1 &
  pprl_pids+=($!)
done
wait "${pprl_pids[@]}" || true  # the two PPRL runs only (the rows keep going)
for d in pprl pprl_plain; do
  [ -f "$W/$d/model_index.json" ] || { echo "PPRL $d did not finish in its 120 s: lower --max-steps" >&2; exit 1; }
  inherit "$W/$d"
done
say "pprl, simple rl"

# 4. DSWM λ grid on the selection seed ∥ the aligned rows
rows pprl simple-rl pprl-regions aligned-4nfe
timeout 120 clvr eval dswm-grid --base "$BASE" --aligned "$W/pprl" --distilled "$DISTILL" --out "$W/grid" \
  --n "$GRID_N" --seeds 10 --max-iterations 6 --device cuda > "$W/grid.log" 2>&1 || true
cat "$W/grid/grid.md" 2>/dev/null || { echo "the λ grid did not finish: see $W/grid.log" >&2; exit 1; }
say "grid"

# 5. the merged row, then the whole table (every other row is read back)
wait || true
timeout 60 clvr eval table --spec "$W/rows.json" --out "$T" --n "$N" --seeds 1,2 --edits "$N" --per-tier 3 \
  --device cuda > "$W/table.log" 2>&1 || { tail -5 "$W/table.log"; exit 1; }
cat "$T/table.md"
say "table"
