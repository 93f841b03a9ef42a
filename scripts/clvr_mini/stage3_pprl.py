"""clvr-mini stage 3: PPRL (Flow-GRPO) of the SFT model with the project's ``PPRLTrainer``.

Proxy prompts are half text→image prompts, half the loop's edit histories (accumulated prompt + the
wrong canvas as reference). R = w·R_text + (1-w)·R_ref with

* R_text = GenEval partial credit of the *original* prompt (first line) on the drawn canvas, from the
  ShapeWorld detector: ``shapeworld_reward`` after upscaling the 64 px sample to ShapeWorld's 256 px
  (the detector is calibrated there; at 64 px most objects fall under its minimum area);
* R_ref = ``pixel_similarity_reward`` to the reference canvas (1 for text→image prompts).

This is ``clvr train pprl --reward shapeworld`` except for the two reward details above, which the CLI
cannot express yet (see docs/clvr_mini.md).

  python scripts/clvr_mini/stage3_pprl.py --model clvr_mini_work/sft --out clvr_mini_work/pprl --max-steps 30
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CANVAS = 256


def canvas_reward(images, prompts, refs):
    """``shapeworld_reward`` on 256 px canvases, judged against the original prompt (first line)."""
    from PIL import Image

    from clvr_agent.training.pprl import shapeworld_reward

    ups = [im.convert("RGB").resize((CANVAS, CANVAS), Image.Resampling.LANCZOS) for im in images]
    return shapeworld_reward(ups, [p.split("\n")[0] for p in prompts], refs)


def proxy_items(data: Path, n: int, seed: int) -> list:
    """``n`` proxy prompts from an SFT JSONL: text→image prompts as strings, edits as {prompt, references}."""
    root = data.parent
    recs = [json.loads(ln) for ln in data.read_text().splitlines() if ln.strip()]
    t2i = [r["prompt"] for r in recs if not r["references"]]
    edits = [{"prompt": r["prompt"], "references": [str(root / p) for p in r["references"]]} for r in recs if r["references"]]
    rng = random.Random(seed)
    items = rng.sample(t2i, n // 2) + rng.sample(edits, n - n // 2)
    rng.shuffle(items)
    return items


def main() -> None:
    import torch
    from diffusers import Flux2KleinPipeline

    from clvr_agent.training.diffusion_configs import PPRLConfig
    from clvr_agent.training.pprl import PPRLTrainer, pixel_similarity_reward

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("clvr_mini_work/data_sft/data.jsonl"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps (clvr train's --max-steps)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale of the rollouts (the base's own)")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = PPRLConfig(
        output_dir=str(a.out), height=64, width=64, max_steps=a.max_steps, num_steps=10, guidance_scale=a.guidance_scale,
        noise_level=0.7, group_size=8, groups_per_step=2, train_timestep_fraction=0.6, text_weight=0.8,
        learning_rate=3e-4, lora_rank=16, max_sequence_length=48, checkpoint_every=10, keep_checkpoints=1,
        resume=a.resume,
    )
    pipe = Flux2KleinPipeline.from_pretrained(str(a.model))
    trainer = PPRLTrainer(pipe, cfg, proxy_items(a.data, a.prompts, 0), canvas_reward, pixel_similarity_reward)
    history = trainer.train()
    print(json.dumps({"out": str(a.out), **(history[-1] if history else {})}, default=str))


if __name__ == "__main__":
    main()
