"""clvr-mini-vlm data on a harsher simulated executor: more failing canvases for the verifier to learn.

`clvr synth --record-calls` on the default ShapeWorld executor draws most canvases right (in a tier-1-8 run
about 1 verdict in 4 is unmet), so a learned verifier sees few failures. This runs the same data engine
(:func:`~clvr_agent.training.synth.synthesize`, the ShapeWorld controller as teacher, every call recorded with
the exact detector's verdict) on a :class:`~clvr_agent.tools.shapeworld.world.WorldConfig` that corrupts more
constraints per draw and lands fewer edits; the settings are written to ``OUT/harsh_executor.json``.

Usage: python scripts/clvr_mini/synth_harsh.py OUT_DIR --n 800 --seed 41 [--prompts tiers] [--eps 0.12]
       [--edit-success 0.6]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
from clvr_agent.tools.shapeworld.world import WorldConfig
from clvr_agent.training.synth import SynthConfig, synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--prompts", default="tiers")
    p.add_argument("--max-tier", type=int, default=8)
    p.add_argument("--eps", type=float, default=0.12, help="corruption probability per atomic constraint (default 0.04)")
    p.add_argument("--edit-success", type=float, default=0.6, help="probability an edit op lands (default 0.85)")
    a = p.parse_args()
    try:
        world = WorldConfig(eps_per_constraint=a.eps, edit_success=a.edit_success)
        config = SynthConfig(out=str(a.out), n=a.n, seed=a.seed, prompts=a.prompts, max_tier=a.max_tier,
                             record_calls=True, progress=False)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "harsh_executor.json").write_text(json.dumps(asdict(world), indent=2) + "\n")
    report = synthesize(config, ShapeWorldExecutor(world), ShapeWorldController())
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
