"""Turn a running stage's newest resumable checkpoint into a diffusers folder (e.g. to ship it).

A ``clvr train`` run writes its diffusers folder only at the end; this applies
``<run>/checkpoints/step-N/`` (trained parameters + latent BN statistics, ``diffusion_loop.apply_checkpoint``) to the
stage's starting folder and exports it with the trainers' own ``export_pipeline``.

  python scripts/clvr_mini/export_checkpoint.py --start clvr_mini_work/joint --run clvr_mini_work/base \
      --out tools/models/clvr-mini
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    from diffusers import Flux2KleinPipeline

    from clvr_agent.training import diffusion_loop as dl
    from clvr_agent.training.checkpointing import latest_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=Path, required=True, help="the folder the stage was started from (--model)")
    p.add_argument("--run", type=Path, required=True, help="the stage's --out folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--card", type=str, default="", help="JSON merged into training_args.json")
    a = p.parse_args()
    ckpt = latest_checkpoint(a.run)
    if ckpt is None:
        raise SystemExit(f"no checkpoint under {a.run / 'checkpoints'} yet")
    pipe = Flux2KleinPipeline.from_pretrained(str(a.start))
    step = dl.apply_checkpoint(pipe, ckpt)
    if a.out.exists():
        shutil.rmtree(a.out)
    card = {"start": str(a.start), "run": str(a.run), "checkpoint_step": step, **(json.loads(a.card) if a.card else {})}
    dl.export_pipeline(pipe, a.out, card=card)
    print(json.dumps({"out": str(a.out), "step": step}))


if __name__ == "__main__":
    main()
