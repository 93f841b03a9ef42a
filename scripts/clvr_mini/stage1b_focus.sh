#!/usr/bin/env bash
# clvr-mini stage 1b: the base's second phase, which made the transformer read the text and draw shapes.
#
# Stage 1 (VAE + text encoder + transformer jointly, ShapeWorld's 24–72 px objects) gives clean canvases
# but a model that ignores the prompt. Two measured causes (docs/clvr_mini.md): the jointly trained text
# encoder collapsed 7 of the 10 colour words onto nearly one embedding, and with small objects at random
# places the text explains almost none of the flow-matching loss. So, every phase below trains the
# transformer only (VAE frozen from stage 1; a *fresh random text encoder, frozen*, whose word features
# stay distinct), at batch 32, lr 1e-3, on data where the text decides more pixels:
#   a. 1,250 steps, objects 56–112 px (4,000 single/two-object tag pairs + 3,000 pairs over every tag/tier)
#   b.   750 steps, + 3,000 pairs of 96–128 px objects (colors / single_object / two_object), twice
#   c. STEPS_C steps (3,500 for the shipped base), same data, σ ~ logit-normal(1.5, 1): training where the
#      text matters (high noise) — the change that made the model follow the prompt
#   e. STEPS_E steps (1,500) on lone objects drawn at the canvas centre only, σ ~ logit-normal(1.5, 1), cosine
#      learning rate: with the position fixed, the high-noise target *is* the shape — the change that made
#      the model draw shapes (shape hit 0.27 → 0.80; docs/clvr_mini.md, third run)
#   f. STEPS_F steps (1,500): a second cosine cycle on DATA_F (default: the same centred lone objects).
#   g. STEPS_G steps (3,000): a third cosine cycle on 6,000 centred lone objects, three in four of them
#      with a colour word (colour hit 0.79 -> 0.87, shape hit 0.93 -> 1.00 at CFG 2.5; the fourth run's base).
#      The centred *mix* (lone objects + the large-object scenes at random places) undid the shapes within
#      500 steps at this learning rate (shape hit 0.80 → 0.28), so the shipped base is a lone-object model.
#   SHAPES=0 stops after phase c, as the second run's base did.
# (Phase a ran as 500 steps with the stage-1 text encoder, then 750 with the fresh one; here it is one
# phase with the fresh encoder.) Each phase starts from the previous one's exported folder. CENTRE=1 adds
# phase d (side experiment J in docs/clvr_mini.md): the centred mix at constant learning rate.
#   W=clvr_mini_work START=clvr_mini_work/base STEPS_C=3500 bash scripts/clvr_mini/stage1b_focus.sh
set -euo pipefail
W=${W:-clvr_mini_work}
START=${START:-$W/base}
INIT=${INIT:-$W/init}
STEPS_C=${STEPS_C:-3500}
STEPS_D=${STEPS_D:-1000}
STEPS_E=${STEPS_E:-1500}
STEPS_F=${STEPS_F:-1500}
STEPS_G=${STEPS_G:-3000}
DATA_F=${DATA_F:-data_centre/data.jsonl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
gen() {  # gen DIR ARGS...: one seeded dataset, once
  local d=$1; shift
  [ -f "$W/$d/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/$d" "$@"
}
gen data_big_focus --pairs 4000 --tier-fraction 0 --tags colors,single_object,two_object,color_attr --min-size 56 --max-size 112 --seed 11
gen data_big_t2i --pairs 3000 --min-size 56 --max-size 112 --seed 12
gen data_huge --pairs 3000 --tier-fraction 0 --tags colors,single_object,colors,two_object --min-size 96 --max-size 128 --seed 21
gen data_centre --pairs 3000 --tier-fraction 0 --tags colors,single_object --centre-single --min-size 96 --max-size 128 --seed 31
gen data_centre2 --pairs 6000 --tier-fraction 0 --tags colors,colors,colors,single_object --centre-single --min-size 96 --max-size 128 --seed 41
python scripts/clvr_mini/mix.py "$W" data_big_focus data_big_focus data_big_t2i
python scripts/clvr_mini/mix.py "$W" data_huge data_huge data_huge data_big_focus data_big_t2i
python scripts/clvr_mini/mix.py "$W" data_centre data_centre data_centre data_huge data_huge data_big_focus data_big_t2i
prev=$W/base1b_start
if [ ! -f "$prev/model_index.json" ]; then  # stage 1's VAE and transformer, a fresh text encoder
  rm -rf "$prev"; cp -r "$START" "$prev"; rm -rf "$prev/text_encoder"; cp -r "$INIT/text_encoder" "$prev/"
fi
phase() {  # phase NAME DATA_JSONL STEPS LOGIT_MEAN [LR_SCHEDULER]
  local name=$1 data=$2 steps=$3 mean=$4 sched=${5:-constant_with_warmup}
  if [ ! -f "$W/$name/model_index.json" ]; then
    clvr train sft-diffusion --model "$prev" --data "$W/$data" --out "$W/$name" --max-steps "$steps" \
      --batch-size 32 --learning-rate 1e-3 --lr-scheduler "$sched" --warmup-steps 20 --logit-mean "$mean" \
      --no-set-bn-stats --max-sequence-length 48 --height 64 --width 64 --log-every 10 --checkpoint-every 250 \
      --keep-checkpoints 2 $( [ -d "$W/$name/checkpoints" ] && echo --resume )
  fi
  prev=$W/$name
}
phase base1b_a data_big_focus/mix.jsonl 1250 0.0
phase base1b_b data_huge/mix.jsonl 750 0.0
phase base1b_c data_huge/mix.jsonl "$STEPS_C" 1.5
[ "${CENTRE:-0}" = 1 ] && phase base1b_d data_centre/mix.jsonl "$STEPS_D" 1.5
if [ "${SHAPES:-1}" = 1 ]; then
  phase base1b_e data_centre/data.jsonl "$STEPS_E" 1.5 cosine  # centred lone objects only: shapes
  phase base1b_f "$DATA_F" "$STEPS_F" 1.5 cosine
  phase base1b_g data_centre2/data.jsonl "$STEPS_G" 1.5 cosine  # colours
fi
echo "base: $prev"
