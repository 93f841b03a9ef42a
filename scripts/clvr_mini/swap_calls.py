"""Counterfactual verify calls: each recorded verify call again, with another prompt's canvas and the exact verdict.

A probe of clvr-mini-vlm (`clvr eval controller`'s swapped-canvas row) found its verifier answers from the text:
the prompt and the history lines ("verdict: score 0.50, expected circle>=1, found 0") predict most verdicts of
the recorded loops, so SFT on them never needs the image. Here every sampled verify call keeps its prompt, plan
and history and gets the canvas of a verify call with another prompt; the teacher (the ShapeWorld controller,
whose detector reads the pixels) writes the verdict on that canvas. The same text now comes with opposite
verdicts, and only the image tells them apart. Inference sends exactly these calls (a verify call whose canvas
disagrees with the history is what a failed edit produces), so the renderer and the contract are unchanged.

Usage: python scripts/clvr_mini/swap_calls.py OUT SRC [SRC ...] [--n 16000] [--seed 0] [--same-tag 0.5]
Writes OUT/calls-swapped.jsonl (absolute image paths, readable by `clvr train sft-vlm --data OUT` in place) and
OUT/swap.json with the counts of satisfied and unmet verdicts and constraints.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from balance_calls import read_calls  # noqa: E402

from clvr_agent.tools.shapeworld.controller import ShapeWorldController  # noqa: E402


def _kinds(call) -> tuple:
    """The constraint kinds of a call's plan: swaps within the same kinds give partial matches, not only misses."""
    return tuple(sorted(c.kind for c in call.plan.constraints)) if call.plan is not None else ()


def swap(calls, n: int, seed: int, same_tag: float):
    """``n`` counterfactual verify calls and the counts of what they teach."""
    verify = [c for c in calls if c.task == "verify" and c.image is not None and c.plan is not None]
    if len(verify) < 2:
        raise SystemExit(f"error: need at least 2 recorded verify calls, found {len(verify)}")
    rng = random.Random(seed)
    by_kinds = defaultdict(list)
    for c in verify:
        by_kinds[_kinds(c)].append(c)
    teacher = ShapeWorldController()
    out, counts = [], Counter()
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        call = rng.choice(verify)
        pool = by_kinds[_kinds(call)] if rng.random() < same_tag else verify
        other = rng.choice(pool)
        if other.prompt == call.prompt:
            continue
        canvas = other.image.open()
        verdict = teacher.verify(call.prompt, call.plan, canvas, call.history)
        out.append(call.model_copy(update={"image": other.image, "reply": verdict.model_dump_json(),
                                           "meta": {**call.meta, "swapped_from": other.prompt}}))
        counts["verify:met" if verdict.satisfied else "verify:unmet"] += 1
        counts["constraints:met"] += sum(c.satisfied for c in verdict.constraints)
        counts["constraints:unmet"] += sum(not c.satisfied for c in verdict.constraints)
        counts["with_history"] += bool(call.history)
    return out, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--n", type=int, default=16000, help="counterfactual calls to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-tag", type=float, default=0.5,
                   help="fraction of swaps drawn from prompts with the same constraint kinds (partial matches)")
    a = p.parse_args()
    if a.n < 1 or not 0 <= a.same_tag <= 1:
        p.error(f"need --n >= 1 and 0 <= --same-tag <= 1, got {a.n} and {a.same_tag}")
    calls, counts = swap(read_calls(a.sources), a.n, a.seed, a.same_tag)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "calls-swapped.jsonl.tmp"
    tmp.write_text("".join(c.model_dump_json() + "\n" for c in calls))
    tmp.replace(a.out / "calls-swapped.jsonl")
    report = {"written": len(calls), "counts": dict(counts),
              "args": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                       for k, v in vars(a).items()}}
    (a.out / "swap.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["counts"]))


if __name__ == "__main__":
    main()
