"""Counterfactual verify calls: each recorded verify call again, with another prompt's canvas and the exact verdict.

A probe of clvr-mini-vlm (`clvr eval controller`'s swapped-canvas row) found its verifier answers from the text:
the prompt and the history lines ("verdict: score 0.50, expected circle>=1, found 0") predict most verdicts of
the recorded loops, so SFT on them never needs the image. Here every sampled verify call keeps its prompt, plan
and history and gets the canvas of a verify call with another prompt; the teacher (the ShapeWorld controller,
whose detector reads the pixels) writes the verdict on that canvas. The same text now comes with opposite
verdicts, and only the image tells them apart. Inference sends exactly these calls (a verify call whose canvas
disagrees with the history is what a failed edit produces), so the renderer and the contract are unchanged.

Swaps from other prompts are almost all unmet (97 % of whole verdicts on the h18 data), and a student trained
on them learns "unmet" rather than reading (h18 J: recall of `satisfied` 0.17). ``--same-prompt P`` draws a
fraction P of the canvases from the same prompt's other recorded canvases (other iterations of its loop, where
the history says one thing and the canvas another, in both directions), and ``--satisfied F`` keeps whole
verdicts at a fraction F satisfied by rejecting candidates of the class already over its share.

Usage: python scripts/clvr_mini/swap_calls.py OUT SRC [SRC ...] [--n 16000] [--seed 0] [--same-tag 0.5]
       [--same-prompt 0.0] [--satisfied F]
Writes OUT/calls-swapped.jsonl (absolute image paths, readable by `clvr train sft-vlm --data OUT` in place) and
OUT/swap.json with the counts of satisfied and unmet verdicts and constraints.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from balance_calls import read_calls, write_calls  # noqa: E402

from clvr_agent.tools.shapeworld.controller import ShapeWorldController  # noqa: E402


def _kinds(call) -> tuple:
    """The constraint kinds of a call's plan: swaps within the same kinds give partial matches, not only misses."""
    return tuple(sorted(c.kind for c in call.plan.constraints)) if call.plan is not None else ()


def swap(calls, n: int, seed: int, same_tag: float, same_prompt: float = 0.0, satisfied: float | None = None):
    """``n`` counterfactual verify calls and the counts of what they teach.

    ``same_prompt``: the fraction of canvases drawn from the same prompt's other canvases; ``satisfied``: the
    fraction of whole verdicts to keep satisfied (None: whatever the draws give).
    """
    verify = [c for c in calls if c.task == "verify" and c.image is not None and c.plan is not None]
    if len(verify) < 2:
        raise SystemExit(f"error: need at least 2 recorded verify calls, found {len(verify)}")
    rng = random.Random(seed)
    by_kinds, by_prompt = defaultdict(list), defaultdict(dict)
    for c in verify:
        by_kinds[_kinds(c)].append(c)
        by_prompt[c.prompt][c.image.sha256] = c.image
    teacher = ShapeWorldController()
    out, counts = [], Counter()
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        call = rng.choice(verify)
        if rng.random() < same_prompt:
            images = [im for sha, im in by_prompt[call.prompt].items() if sha != call.image.sha256]
            if not images:
                continue
            image, source = rng.choice(images), call.prompt
        else:
            pool = by_kinds[_kinds(call)] if rng.random() < same_tag else verify
            other = rng.choice(pool)
            if other.prompt == call.prompt:
                continue
            image, source = other.image, other.prompt
        verdict = teacher.verify(call.prompt, call.plan, image.open(), call.history)
        if satisfied is not None:
            share = satisfied if verdict.satisfied else 1 - satisfied
            same_class = counts["verify:met" if verdict.satisfied else "verify:unmet"] + 1
            if same_class > math.ceil(share * (len(out) + 1)):
                continue
        out.append(call.model_copy(update={"image": image, "reply": verdict.model_dump_json(),
                                           "meta": {**call.meta, "swapped_from": source,
                                                    "replaced_image": call.image.sha256}}))
        counts["verify:met" if verdict.satisfied else "verify:unmet"] += 1
        counts["constraints:met"] += sum(c.satisfied for c in verdict.constraints)
        counts["constraints:unmet"] += sum(not c.satisfied for c in verdict.constraints)
        counts["with_history"] += bool(call.history)
        counts["same_prompt"] += source == call.prompt
    return out, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--n", type=int, default=16000, help="counterfactual calls to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-tag", type=float, default=0.5,
                   help="fraction of swaps drawn from prompts with the same constraint kinds (partial matches)")
    p.add_argument("--same-prompt", type=float, default=0.0,
                   help="fraction of canvases drawn from the same prompt's other recorded canvases")
    p.add_argument("--satisfied", type=float, default=None,
                   help="keep this fraction of whole verdicts satisfied (rejecting draws of the class over its share)")
    a = p.parse_args()
    if a.n < 1 or not 0 <= a.same_tag <= 1 or not 0 <= a.same_prompt <= 1:
        p.error(f"need --n >= 1 and --same-tag, --same-prompt in [0, 1], got {a.n}, {a.same_tag}, {a.same_prompt}")
    if a.satisfied is not None and not 0 < a.satisfied < 1:
        p.error(f"--satisfied must be strictly between 0 and 1, got {a.satisfied}")
    calls, counts = swap(read_calls(a.sources), a.n, a.seed, a.same_tag, a.same_prompt, a.satisfied)
    if len(calls) < a.n:
        print(f"warning: wrote {len(calls)} of {a.n} (the draws rarely give the verdicts asked)", file=sys.stderr)
    report = {"written": len(calls), "counts": dict(counts)}
    write_calls(a.out, "swapped", calls, report, a)
    print(json.dumps(report["counts"]))


if __name__ == "__main__":
    main()
