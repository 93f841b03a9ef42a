#!/usr/bin/env bash
# Ship a clvr-mini stage into the package (tools/models/clvr-mini, what --backend clvr-mini loads).
#   bash scripts/clvr_mini/ship.sh FOLDER                 # a finished stage's diffusers folder
#   bash scripts/clvr_mini/ship.sh --run RUN --start START  # the newest checkpoint of a running stage
set -euo pipefail
DEST=$(python -c "import clvr_agent, pathlib; print(pathlib.Path(clvr_agent.__file__).parent / 'models' / 'clvr-mini')")
if [ "$1" = "--run" ]; then
  python scripts/clvr_mini/export_checkpoint.py --run "$2" --start "$4" --out "$DEST"
else
  rm -rf "$DEST"; mkdir -p "$(dirname "$DEST")"; cp -r "$1" "$DEST"
  rm -rf "$DEST/checkpoints" "$DEST/log.jsonl" "$DEST/teacher_cache"*
fi
# clvr-mini draws at 64 px and hands the ShapeWorld controller 256 px canvases (Flux2KleinExecutor reads this),
# at the CFG scale measured best for the base (GUIDANCE; colour_shape.py --guidance sweeps it).
echo "{\"draw_size\": 64, \"canvas_size\": 256, \"guidance\": ${GUIDANCE:-2.5}}" > "$DEST/clvr_canvas.json"
du -sh "$DEST"; ls "$DEST"
