#!/usr/bin/env bash
# clvr-mini stage 1: data, random init, then the base text→image model (28 steps, CFG), all through
# `clvr train sft-diffusion`, training VAE + text encoder + transformer jointly on text→image pairs
# (the VAE needs >1k steps before shapes survive its round trip, so it is never frozen here; latent
# BN statistics follow an EMA). Resumable: rerun with RESUME=--resume. Ship a checkpoint mid-run with
# export_checkpoint.py --start $W/init --run $W/joint.
#   W=clvr_mini_work JOINT_STEPS=20000 bash scripts/clvr_mini/stage1_base.sh
set -euo pipefail
W=${W:-clvr_mini_work}
PAIRS=${PAIRS:-5000}
JOINT_STEPS=${JOINT_STEPS:-20000}
BATCH=${BATCH:-16}
LR=${LR:-2e-3}
SEQ=${SEQ:-48}
RESUME=${RESUME:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$W"
[ -f "$W/data_t2i/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/data_t2i" --pairs "$PAIRS" --seed 0
[ -f "$W/data_edit_small/data.jsonl" ] || python -m clvr_agent.training.clvr_mini_data "$W/data_edit_small" --pairs 0 --edits 400 --seed 1
[ -f "$W/init/model_index.json" ] || python scripts/clvr_mini/init_model.py "$W/init" --size 64 --max-length "$SEQ" \
  --data "$W/data_t2i/data.jsonl" --data "$W/data_edit_small/data.jsonl"
COMMON=(--batch-size "$BATCH" --max-sequence-length "$SEQ" --height 64 --width 64 --log-every 10 --checkpoint-every 200 --keep-checkpoints 2)
clvr train sft-diffusion --model "$W/init" --data "$W/data_t2i/data.jsonl" --out "$W/joint" $RESUME \
  --max-steps "$JOINT_STEPS" --learning-rate "$LR" --warmup-steps 50 --train-vae --train-text-encoder "${COMMON[@]}"
