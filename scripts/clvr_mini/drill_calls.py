"""Reading drills: verify calls that only the image can answer ("a photo of a red circle" on a canvas, no history).

Issue 18's probes found clvr-mini-vlm's verifier answers from the text. Swapped calls (`swap_calls.py`) keep
the recorded prompts, plans and histories, where the text still says much; a drill says nothing: one
colour+shape presence constraint, an empty history, and a canvas that holds that object half of the time
(an object the ShapeWorld detector finds on it) and not the other half (a colour+shape it does not find).
The teacher (the ShapeWorld controller) plans the prompt and writes the exact verdict, so the drills are
ordinary verify calls in the controller's own format: the renderer and the contract are unchanged.

Usage: python scripts/clvr_mini/drill_calls.py OUT SRC [SRC ...] [--n 8000] [--seed 0]
       python scripts/clvr_mini/drill_calls.py OUT --score VLM   (puts OUT's drills to the qwen3-vl controller)
SRC: folders of recorded calls (`clvr synth --record-calls`); their verify canvases are the drills' canvases.
Writes OUT/calls-drill.jsonl (absolute image paths; `clvr train sft-vlm --data OUT` reads it in place) and
OUT/drill.json with the counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from balance_calls import read_calls, write_calls  # noqa: E402

from clvr_agent.tools.conversation import ControllerCall  # noqa: E402
from clvr_agent.tools.shapeworld.controller import ShapeWorldController  # noqa: E402
from clvr_agent.tools.shapeworld.detect import detect  # noqa: E402
from clvr_agent.tools.shapeworld.world import CLASSES, PALETTE  # noqa: E402


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def drills(calls: list[ControllerCall], n: int, seed: int) -> tuple[list[ControllerCall], Counter]:
    images = list({c.image.sha256: c.image for c in calls if c.task == "verify" and c.image is not None}.values())
    if not images:
        raise ValueError("the sources hold no recorded verify call with a canvas")
    rng = random.Random(seed)
    teacher = ShapeWorldController()
    pairs = [(c, s) for c in PALETTE for s in CLASSES]
    out, counts, tries = [], Counter(), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"the detector finds no object on the sources' canvases ({len(out)} drills of {n})")
        ref = rng.choice(images)
        canvas = ref.open()
        present = sorted({(d.color, d.cls) for d in detect(canvas) if d.color in PALETTE})
        want = len(out) % 2 == 0  # alternate: a present object, then an absent one
        pool = present if want else [p for p in pairs if p not in present]
        if not pool:
            continue
        colour, shape = rng.choice(pool)
        prompt = f"a photo of {article(colour)} {colour} {shape}"
        plan = teacher.plan(prompt)
        verdict = teacher.verify(prompt, plan, canvas, [])
        out.append(ControllerCall(task="verify", prompt=prompt, plan=plan, image=ref, reply=verdict.model_dump_json(),
                                  meta={"teacher": "shapeworld", "drill": True}))
        counts["verify:met" if verdict.satisfied else "verify:unmet"] += 1
    return out, counts


def score(calls: list[ControllerCall], controller) -> dict:
    """Whole-verdict agreement of ``controller.verify`` with the drills' replies, per class and balanced."""
    right = Counter()
    total = Counter()
    for c in calls:
        truth = json.loads(c.reply)["satisfied"]
        got = controller.verify(c.prompt, c.plan, c.image.open(), []).satisfied
        total[truth] += 1
        right[truth] += got == truth
    recall = {k: right[k] / total[k] for k in total}
    return {"n": len(calls), "agreement": sum(right.values()) / len(calls),
            "recall_met": recall.get(True), "recall_unmet": recall.get(False),
            "balanced": sum(recall.values()) / len(recall)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("sources", type=Path, nargs="*")
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", metavar="VLM", help="score the qwen3-vl controller (folder or shipped name) on OUT's drills")
    a = p.parse_args()
    if a.score:
        from clvr_agent.tools.registry import get_controller
        from clvr_agent.training.sft_vlm import load_calls

        if not (a.out / "calls-drill.jsonl").is_file():
            p.error(f"{a.out} holds no calls-drill.jsonl (write drills there first)")
        controller = get_controller("qwen3-vl", vlm=a.score, torch_dtype="float32", device="cpu")
        result = {"vlm": a.score, **score(load_calls(a.out), controller)}
        name = Path(a.score).name
        (a.out / f"score-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    if not a.sources:
        p.error("give at least one SRC folder of recorded calls (or --score VLM)")
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    try:
        calls, counts = drills(read_calls(a.sources), a.n, a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report = {"written": len(calls), "counts": dict(counts)}
    write_calls(a.out, "drill", calls, report, a)
    print(json.dumps(report["counts"]))


if __name__ == "__main__":
    main()
