"""Can this controller learn to answer reading drills from the canvas? Trains only the verdict token and watches.

Issue 18: no controller SFT run taught clvr-mini-vlm to answer drills (`drill_calls.py`) above chance. This
instrument asks the narrowest version of the question. It trains a copy of a controller folder's model in
memory on one token per drill, the value after ``{"satisfied":`` in the reply the controller renders, through
`clvr train sft-vlm`'s own loss (shared system prefix, the same collator and renderer), and every
``--eval-every`` steps scores held-out drills threshold-free: the AUC of logit(true) - logit(false), and the
balanced accuracy of its sign. Nothing is saved but the curve.

``--label`` picks what that token must say, to locate where reading breaks down:
- ``verdict`` (default): the teacher's verdict, "is there a <colour> <shape>?";
- ``colour``: whether the colour the prompt names is anywhere on the canvas (whatever the shape): the question
  still comes from the prompt, but one attribute;
- ``red``: whether anything red is on the canvas: the same answer whatever the prompt says (no question to read).
``colour`` and ``red`` are read off the canvas by the ShapeWorld detector.

``--caption F`` makes a fraction F of each batch caption conversations instead (the training drills' canvases;
"Which objects are on the canvas?" answered with every object the detector finds, "found red circle, blue square",
in a fixed order; loss on the whole reply). A drill's answer is a product of two things the model must learn
together, which word the prompt names and what the canvas holds, so neither gets a gradient alone; a caption
asks only the second.

Usage: python scripts/clvr_mini/drill_learn.py VLM TRAIN HELD OUT.json [--label verdict] [--steps 1000]
       [--batch-size 16] [--learning-rate 1e-3] [--eval-every 100] [--n-held 200] [--caption 0] [--seed 0]
TRAIN, HELD: `drill_calls.py` output folders (their calls-drill.jsonl). Bad input exits 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

LABELS = ("verdict", "colour", "red")


def answers(calls, label: str) -> list[bool]:
    """What the decisive token must say for each drill."""
    if label == "verdict":
        return [bool(json.loads(c.reply)["satisfied"]) for c in calls]
    from clvr_agent.tools.shapeworld.detect import detect

    out = []
    for c in calls:
        colours = {d.color for d in detect(c.image.open())}
        out.append("red" in colours if label == "red" else c.prompt.split()[-2] in colours)
    return out


CAPTION_QUESTION = "Which objects are on the canvas?"


def caption(image) -> str:
    """Every object the detector finds, as "found <colour> <shape>, ...", in palette then shape order (a word-level
    vocabulary spells the first word of a reply without its leading space: "found" is a word there)."""
    from clvr_agent.tools.shapeworld.detect import detect
    from clvr_agent.tools.shapeworld.world import CLASSES, PALETTE

    colours, shapes = list(PALETTE), list(CLASSES)
    found = sorted(((d.color, d.cls) for d in detect(image) if d.color in PALETTE and d.cls in CLASSES),
                   key=lambda cs: (colours.index(cs[0]), shapes.index(cs[1])))
    return "found " + (", ".join(f"{c} {s}" for c, s in found) or "nothing")


def caption_conversation(image_path: str) -> list[dict]:
    """A caption request laid out like a controller call: the question, then the canvas, in one user turn."""
    from PIL import Image

    with Image.open(image_path) as im:
        canvas = im.convert("RGB")
    return [{"role": "user", "content": [{"type": "text", "text": CAPTION_QUESTION},
                                         {"type": "image", "image": canvas}]},
            {"role": "assistant", "content": caption(canvas)}]


def auc(scores: list[float], truth: list[bool]) -> float:
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    if not pos or not neg:
        return float("nan")
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def auc_interval(a: float, n_pos: int, n_neg: int) -> list[float]:
    """95 % interval of an AUC from its standard error (Hanley and McNeil, 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))
    return [round(max(0.0, a - 1.96 * se), 4), round(min(1.0, a + 1.96 * se), 4)]


def balanced(scores: list[float], truth: list[bool]) -> float:
    recalls = [sum((s > 0) == k for s, t in zip(scores, truth) if t == k) / max(1, sum(t == k for t in truth))
               for k in (True, False) if k in truth]
    return sum(recalls) / len(recalls)


def learn(vlm: str, train_calls, held_calls, *, label: str, steps: int, batch_size: int, lr: float,
          eval_every: int, seed: int, caption_share: float = 0.0) -> dict:
    import torch

    from clvr_agent.tools.conversation import RenderOptions
    from clvr_agent.tools.qwen3_vl import controller_settings, load_qwen3_vl
    from clvr_agent.training.sft_vlm import IGNORE_INDEX, ControllerCallDataset, SFTVLMTrainer
    from clvr_agent.training.vlm_config import SFTVLMConfig

    torch.manual_seed(seed)
    model, processor = load_qwen3_vl(vlm, torch_dtype="float32", device="cpu")
    keys = ("image_size", "history_token_budget", "history_images")  # the settings the controller renders with
    opts = RenderOptions(**{k: v for k, v in controller_settings(vlm).items() if k in keys})
    # the trainer supplies the loss, optimizer and collator; it writes only when train() or a save is called: never here
    cfg = SFTVLMConfig(output_dir=str(Path("/nonexistent") / "drill-learn"), max_steps=steps, batch_size=batch_size,
                       learning_rate=lr, lr_scheduler="constant", warmup_steps=0, train_vision=True,
                       image_size=opts.image_size, history_token_budget=opts.history_token_budget,
                       history_images=opts.history_images, seed=seed, max_grad_norm=1.0)
    trainer = SFTVLMTrainer(model, processor, cfg, ControllerCallDataset(train_calls, opts))
    col = trainer.collator

    def encode(call, yes: bool) -> dict:
        reply = json.loads(call.reply)
        reply["satisfied"] = yes
        conv = ControllerCallDataset([call.model_copy(update={"reply": json.dumps(reply, separators=(",", ":"))})],
                                     opts)[0]
        return col.encode(conv)

    # The decisive token: where a "true" and a "false" reply first differ (its offset in the reply and the two ids).
    t, f = encode(train_calls[0], True)["labels"], encode(train_calls[0], False)["labels"]
    diff = next(j for j, (a, b) in enumerate(zip(t, f)) if a != b)
    first = next(j for j, a in enumerate(t) if a != IGNORE_INDEX)
    offset, ids = diff - first, {True: t[diff], False: f[diff]}

    def decisive(call, yes: bool) -> tuple[dict, int]:
        """The drill encoded with the wanted answer, labelled at the decisive token only."""
        enc = dict(encode(call, yes))
        pos = next(j for j, a in enumerate(enc["labels"]) if a != IGNORE_INDEX) + offset
        if enc["labels"][pos] != ids[yes]:
            raise ValueError(f"a drill's reply does not start like the others ({call.reply[:40]}...)")
        enc["labels"] = [IGNORE_INDEX] * len(enc["labels"])
        enc["labels"][pos] = ids[yes]
        return enc, pos

    cache: dict[int, dict] = {}  # training drills kept encoded (pixels included) for the next epoch, within a budget
    cache_bytes, budget = 0, 2048 * 2**20

    def train_drill(i: int) -> dict:
        nonlocal cache_bytes
        if i in cache:
            return cache[i]
        enc = decisive(train_calls[i], train_truth[i])[0]
        size = sum(v.numel() * v.element_size() for v in enc.values() if hasattr(v, "numel")) + 8 * len(enc["labels"])
        if cache_bytes + size <= budget:
            cache[i], cache_bytes = enc, cache_bytes + size
        return enc

    train_truth = answers(train_calls, label)
    held_truth = answers(held_calls, label)
    held = [decisive(c, y) for c, y in zip(held_calls, held_truth)]

    def evaluate() -> dict:
        trainer.run.eval()
        scores = []
        with torch.no_grad():
            for s in range(0, len(held), 16):
                chunk = held[s:s + 16]
                logits = trainer.run(**col.collate([e for e, _ in chunk])).logits
                for r, (_, pos) in enumerate(chunk):
                    scores.append(float(logits[r, pos - 1, ids[True]] - logits[r, pos - 1, ids[False]]))
        trainer.run.train()
        a, n_pos = auc(scores, held_truth), sum(held_truth)
        return {"auc": round(a, 4), "auc_95": auc_interval(a, n_pos, len(held_truth) - n_pos),
                "balanced": round(balanced(scores, held_truth), 4)}

    order = list(range(len(train_calls)))
    random.Random(seed).shuffle(order)
    curve, t0, running = [{"step": 0, **evaluate()}], time.time(), None
    print(json.dumps(curve[-1]), flush=True)
    n_caption = round(caption_share * batch_size)
    for step in range(1, steps + 1):
        idx = [order[i % len(order)] for i in range((step - 1) * batch_size, step * batch_size)]
        drills = [train_drill(i) for i in idx[n_caption:]]
        loss = trainer.loss(col.collate(drills))[0] * len(drills) / batch_size if drills else 0.0
        if n_caption:
            caps = [col.encode(caption_conversation(train_calls[i].image.path)) for i in idx[:n_caption]]
            loss = loss + trainer.loss(col.collate(caps), share_prefix=False)[0] * n_caption / batch_size
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "loss": round(running, 4), **evaluate(), "seconds": round(time.time() - t0)})
            print(json.dumps(curve[-1]), flush=True)
    return {"vlm": vlm, "label": label, "train": len(train_calls), "held": len(held),
            "held_positive": sum(held_truth) / len(held_truth), "steps": steps, "batch_size": batch_size,
            "learning_rate": lr, "caption": caption_share, "seed": seed, "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vlm", help="controller folder or shipped name (as --vlm of `clvr generate`)")
    p.add_argument("train", type=Path)
    p.add_argument("held", type=Path)
    p.add_argument("out", type=Path, help="JSON file for the curve")
    p.add_argument("--label", choices=LABELS, default="verdict")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-held", type=int, default=200)
    p.add_argument("--caption", type=float, default=0.0, help="share of each batch that is caption conversations")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if min(a.steps, a.batch_size, a.eval_every, a.n_held) < 1 or not a.learning_rate > 0:
        p.error("--steps, --batch-size, --eval-every and --n-held must be >= 1, --learning-rate > 0")
    if not 0.0 <= a.caption < 1.0:
        p.error(f"--caption is a share of the batch in [0, 1), got {a.caption}")
    for d in (a.train, a.held):
        if not (d / "calls-drill.jsonl").is_file():
            p.error(f"{d} holds no calls-drill.jsonl (write drills there with drill_calls.py)")
    if not a.out.parent.is_dir():
        p.error(f"the folder of {a.out} does not exist")
    from clvr_agent.training.sft_vlm import load_calls

    train, held = load_calls(a.train), load_calls(a.held)[:a.n_held]
    try:
        result = learn(a.vlm, train, held, label=a.label, steps=a.steps, batch_size=a.batch_size,
                       lr=a.learning_rate, eval_every=a.eval_every, seed=a.seed, caption_share=a.caption)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # written beside and moved in: a kill leaves no half file, two runs on one OUT leave one whole curve
    with tempfile.NamedTemporaryFile("w", dir=a.out.parent, prefix=a.out.name + ".", delete=False) as tmp:
        tmp.write(json.dumps(result, indent=2) + "\n")
    Path(tmp.name).replace(a.out)
    print(json.dumps(result["curve"][-1]))


if __name__ == "__main__":
    main()
