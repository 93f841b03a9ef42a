"""clvr-mini stage 3: PPRL of the SFT model on the loop's own states — ``clvr train pprl`` with clvr-mini's settings.

Rollout contexts are the executor calls of a ``clvr synth --backend clvr-mini --record-calls`` folder
(accumulated prompt + reference canvases, as the loop made them; region draws left out). With
``--proxy shapeworld`` (PPRL) the ShapeWorld teacher turns each into the scene the step should produce
and the pixels to preserve; with ``--proxy plain`` (the simple-RL row) the target is the raw history.
R = 0.8 · R_text (GenEval partial credit × extra-object penalty, ShapeWorld detector on the 256 px
upscale) + 0.2 · R_ref (preservation outside the edited region). Several PPO epochs per rollout batch,
a KL to the SFT model, and the held-out reward curve (``<out>/heldout.json``, always against the
teacher's targets, so the two rows compare).

  python scripts/clvr_mini/stage3_pprl.py --model clvr_mini_work/sft --data clvr_mini_work/synth_mini \\
    --out clvr_mini_work/pprl --max-steps 30 [--proxy plain] [-- any other `clvr train pprl` flag]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    import torch

    from clvr_agent.cli.train import train_app

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("clvr_mini_work/synth_mini"), help="a `clvr synth --record-calls` folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=30, help="rollout batches (each ppo_epochs optimizer steps)")
    p.add_argument("--proxy", default="shapeworld", choices=("shapeworld", "plain"))
    p.add_argument("--heldout-runs", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--guidance-scale", type=float, default=2.5, help="CFG scale of the rollouts (the base's own)")
    a, rest = p.parse_known_args()
    torch.set_num_threads(1)
    args = ["pprl", "--model", str(a.model), "--prompts", str(a.data), "--out", str(a.out), "--proxy", a.proxy,
            "--reward", "shapeworld", "--heldout-runs", str(a.heldout_runs), "--eval-every", str(a.eval_every),
            "--eval-group-size", "4", "--height", "64", "--width", "64", "--max-steps", str(a.max_steps),
            "--num-steps", "10", "--guidance-scale", str(a.guidance_scale), "--noise-level", "0.7",
            "--group-size", "8", "--groups-per-step", "2", "--train-timestep-fraction", "0.6", "--text-weight", "0.8",
            "--learning-rate", "3e-4", "--lora-rank", "16", "--ppo-epochs", "2", "--kl-coef", "0.01",
            "--max-sequence-length", "48", "--checkpoint-every", "10", "--keep-checkpoints", "1",
            *(["--resume"] if a.resume else []), *[r for r in rest if r != "--"]]
    train_app(args)  # exits with the command's status


if __name__ == "__main__":
    main()
