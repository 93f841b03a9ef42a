"""Does clvr-mini follow text? Single-object colour+shape accuracy at fixed seeds.

Draws "a photo of a {colour} {shape}" for every ShapeWorld colour × shape (60 prompts × ``--seeds``) with
the pipeline's own sampler (base: 28 steps, CFG 4; distilled folders: 4 steps, no CFG), upscales each
64 px canvas to the 256 px ShapeWorld canvas as the executor does, reads it with the ShapeWorld detector
and judges it with GenEval's ``colors`` rule (the shared ``clvr_agent.eval.rules``). Reports the pass rate
("single-object colour+shape", the issue's target), colour-only and shape-only hit rates (any detection
of the named colour / class), the strict rate (exactly one object, right class and colour) and the
fraction of seed-matched pairs whose canvases differ between two colour words (0 = text is ignored).

  python scripts/clvr_mini/colour_shape.py --model clvr_mini_work/base [--run RUN_DIR] [--out OUT.json]

``--run`` applies a running stage's newest checkpoint to ``--model`` first (no export needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clvr_agent.eval.colour_shape import measure  # noqa: F401  (evaluate.py imports it from here)


def load(model: str, run: str | None):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model)
    step = None
    if run:
        from clvr_agent.training import diffusion_loop as dl
        from clvr_agent.training.checkpointing import latest_checkpoint

        ckpt = latest_checkpoint(Path(run))
        if ckpt is None:
            raise SystemExit(f"no checkpoint under {run}/checkpoints yet")
        step = dl.apply_checkpoint(pipe, ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe, step


def add_batch_args(p: argparse.ArgumentParser, *, n: int, sigmas: str) -> None:
    """The options of the scripts that look at training records through a model (text_dependence, x0_by_sigma)."""
    p.add_argument("--model", required=True)
    p.add_argument("--run", default=None, help="apply this running stage's newest checkpoint to --model")
    p.add_argument("--data", type=Path, required=True, help="a clvr-mini JSONL")
    p.add_argument("--n", type=int, default=n, help="its first N records")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sigmas", default=sigmas)


def training_batch(pipe, data: Path, n: int, size: int):
    """The first ``n`` records of a clvr-mini JSONL as (prompts, target tokens, their position ids)."""
    from PIL import Image

    from clvr_agent.training import flow_matching as fm

    recs = [json.loads(ln) for ln in data.read_text().splitlines() if ln.strip()][:n]
    images = []
    for r in recs:
        with Image.open(data.parent / r["target"]) as im:
            images.append(im.convert("RGB"))
    tokens, ids = fm.pack_target(pipe, fm.encode_images(pipe, fm.to_pixels(pipe, images, size, size)))
    return [r["prompt"] for r in recs], tokens, ids


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--run", default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: 4 for distilled folders, else 28")
    p.add_argument("--guidance", type=float, default=None,
                   help="default: 1 for distilled folders, else the folder's clvr_canvas.json guidance, else 4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-grid", type=Path, default=None, help="PNG of every canvas (rows: colours, cols: shapes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe, step = load(a.model, a.run)
    if a.guidance is None and not pipe.config.is_distilled:  # the folder's own base CFG scale, as the executor uses
        from clvr_agent.tools.flux2_klein import canvas_config

        a.guidance = canvas_config(Path(a.model)).get("guidance")
    res = {"model": a.model, "run": a.run, "step": step,
           **measure(pipe, seeds=a.seeds, size=a.size, steps=a.steps, guidance=a.guidance, save_grid=a.save_grid)}
    line = json.dumps(res)
    print(line)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
