"""More plan calls for clvr-mini-vlm: the ShapeWorld teacher's plan of many distinct prompts (no loop needed).

A loop records one plan per prompt against ~8 other calls, and a plan is where the controller must copy
the prompt's words into its checklist; so the SFT mix gets extra teacher plans of fresh prompts, written
as ``calls-plans-*.jsonl`` (:class:`~clvr_agent.tools.conversation.ControllerCall` records, as
``clvr synth --record-calls`` writes them).

Usage: python scripts/clvr_mini/plan_calls.py OUT_DIR --n 3000 --seed 11 [--prompts tiers|geneval]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.training.synth import RecordingController, SynthConfig, load_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--prompts", default="tiers")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    recorder = RecordingController(ShapeWorldController(), a.out)
    prompts = sorted(set(load_prompts(SynthConfig(out=str(a.out), n=a.n, seed=a.seed, prompts=a.prompts))))
    for prompt in prompts:
        recorder.plan(prompt)
    path = a.out / f"calls-plans-{a.prompts}-{a.seed}.jsonl"
    with open(path, "w") as f:
        f.writelines(c.model_copy(update={"meta": {"teacher": recorder.name, "source": "plan_calls"}}).model_dump_json() + "\n"
                     for c in recorder.take())
    print(f"{len(prompts)} distinct prompts -> {path}")


if __name__ == "__main__":
    main()
