"""ShapeWorld training data for clvr-mini, written as the diffusion trainers' JSONL + PNGs.

Two kinds of record, both ``{"prompt", "references": [png], "target": png}``:

* text→image pairs: a prompt from the GenEval-style generator (the six tags) or the tier generator
  (1..``max_tier`` atomic constraints), drawn *correctly* by the ShapeWorld world (no error model);
* edit triplets: the loop's own step. A canvas drawn with the world's error model (raised so that
  most canvases are wrong), the ShapeWorld controller's repair instruction for it (the loop's
  instruction language), and the canvas with that instruction applied exactly. The prompt is the
  accumulated prompt the graph builds (original prompt, then the instruction, one per line) and the
  reference is the wrong canvas. A canvas that is already right gets a random valid edit instead, so
  every triplet teaches "change exactly what the instruction says, keep the rest".

Canvases are rendered at ShapeWorld's 256 px (the detector's scale, so the repair instructions are
the ones the loop would issue) and stored downscaled to ``size`` px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from clvr_agent.eval.rules import COLORS, TAGS, evaluate_image
from clvr_agent.tools.shapeworld.controller import repair_ops
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor, apply_op
from clvr_agent.tools.shapeworld.language import NP, Op, format_instruction, geneval_line, tier_line
from clvr_agent.tools.shapeworld.render import render
from clvr_agent.tools.shapeworld.world import CANVAS, CLASSES, MAX_SIZE, MIN_SIZE, RELATIONS, SAME_COLOR_GAP, Obj, Scene, WorldConfig, restyled

EXACT = WorldConfig(eps_per_constraint=0.0, edit_success=1.0, edit_disturb=0.0)


@dataclass
class DataConfig:
    """How many records of each kind, and the prompt mix."""

    pairs: int = 4000
    edits: int = 0
    size: int = 128  # stored side in pixels; the trainer resizes to its own resolution
    tier_fraction: float = 0.3  # share of text→image prompts from the tier generator (rest: GenEval tags)
    max_tier: int = 6
    edit_error: float = 0.25  # per-constraint error probability of the canvas an edit starts from
    min_size: float = float(MIN_SIZE)  # object side range on the 256 px canvas (ShapeWorld's default 24..72)
    max_size: float = float(MAX_SIZE)
    centre_single: bool = False  # draw a prompt's lone object at the canvas centre (a curriculum: the text then decides most pixels)
    slots: bool = False  # snap 2-4 object scenes to fixed slots (a row or a 2x2 grid; see ``snap_to_slots``)
    tags: str = ",".join(TAGS)  # GenEval tags the tag prompts are drawn from (comma-separated), e.g. a curriculum's easy tags
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs < 0 or self.edits < 0 or self.pairs + self.edits == 0:
            raise ValueError("pairs and edits must be ≥ 0 and not both 0")
        if not 0.0 <= self.tier_fraction <= 1.0:
            raise ValueError(f"tier_fraction must be in [0, 1], got {self.tier_fraction}")
        if not 1 <= self.max_tier <= 10:
            raise ValueError(f"max_tier must be in 1..10, got {self.max_tier}")
        if self.size < 16:
            raise ValueError(f"size must be ≥ 16 px, got {self.size}")
        unknown = [t for t in self.tag_list if t not in TAGS]
        if not self.tag_list or unknown:
            raise ValueError(f"tags must be a comma-separated subset of {', '.join(TAGS)}, got {self.tags!r}")
        WorldConfig(sizes=(self.min_size, self.max_size))  # validates the size range

    def world(self, eps: float = 0.0) -> WorldConfig:
        """The world the records are drawn in: exact (``eps = 0``) or with a per-constraint error rate."""
        return WorldConfig(eps_per_constraint=eps, eps_max=0.9 if eps else EXACT.eps_max, edit_success=1.0,
                           edit_disturb=0.0, sizes=(self.min_size, self.max_size))

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]


def sample_line(rng: np.random.Generator, tier_fraction: float, max_tier: int, tags=TAGS) -> dict:
    """A GenEval-style metadata line: a random tag of ``tags``, or with ``tier_fraction`` a random tier."""
    if rng.random() < tier_fraction:
        return tier_line(int(rng.integers(1, max_tier + 1)), rng)
    return geneval_line(str(rng.choice(list(tags))), rng)


def draw_objects(line: dict, rng: np.random.Generator, config: WorldConfig = EXACT) -> list[Obj]:
    """The scene a ShapeWorld generator with ``config``'s error model draws for ``line``."""
    return ShapeWorldExecutor(config).draw(line, rng)


def render_objects(objects: list[Obj], rng: np.random.Generator) -> Image.Image:
    """256 px canvas with fresh lighting per object, as the simulated executor renders."""
    scene = Scene([restyled(o, rng) for o in objects], noise_seed=int(rng.integers(2**31)))
    return render(scene)


def random_edit(objects: list[Obj], rng: np.random.Generator) -> Op:
    """A valid single edit of a scene: recolour, remove or move an existing object, or add a new one."""
    kinds = ["add"] + (["recolor", "remove", "move"] if objects else [])
    kind = str(rng.choice(kinds))
    if kind == "add":
        np_ = NP(str(rng.choice(CLASSES)), 1, str(rng.choice(COLORS)))
        if objects and rng.random() < 0.5:
            ref = objects[int(rng.integers(len(objects)))]
            return Op("add", np_, str(rng.choice(RELATIONS)), NP(ref.cls, None, None))
        return Op("add", np_)
    obj = objects[int(rng.integers(len(objects)))]
    target = NP(obj.cls, 1, obj.color)
    if kind == "recolor":
        return Op("recolor", target, color=str(rng.choice([c for c in COLORS if c != obj.color])))
    if kind == "remove":
        return Op("remove", target)
    others = [o for o in objects if o.cls != obj.cls]
    if not others:
        return Op("remove", target)
    ref = others[int(rng.integers(len(others)))]
    return Op("move", NP(obj.cls, None, None), str(rng.choice(RELATIONS)), NP(ref.cls, None, None))


def edit_triplet(rng: np.random.Generator, cfg: DataConfig) -> Optional[tuple[str, Image.Image, Image.Image]]:
    """(accumulated prompt, wrong canvas, edited canvas), or None when the edit found no room."""
    line = sample_line(rng, cfg.tier_fraction, cfg.max_tier, cfg.tag_list)
    objects = draw_objects(line, rng, cfg.world(cfg.edit_error))
    before = render_objects(objects, rng)
    ops = repair_ops(line, detect(before))
    if not ops:
        ops = [random_edit(objects, rng)]
    edited = list(objects)
    for op in ops:
        if not apply_op(op, edited, rng, cfg.world()):
            return None
    after = render_objects(edited, rng)
    return f"{line['prompt']}\n{format_instruction(ops)}", before, after


def snap_to_slots(objects: list[Obj]) -> Optional[list[Obj]]:
    """The scene with its objects moved to fixed slots, keeping their order along the scene's main axis.

    A position curriculum for a small model: with objects anywhere, the best guess at high noise is a
    position-averaged blob and the shape never forms; with a few fixed slots there are few positions
    to average over. Two objects sit side by side in the canvas's halves (left/right, or top/bottom
    when the scene is more tall than wide), three in a row of thirds, four in a 2x2 grid, each centred
    in its cell and shrunk to leave a gap. Order along the axis is kept, so a relation the scene
    satisfied still holds. Returned in the input's order; ``None`` for other counts.
    """
    n = len(objects)
    if n < 2 or n > 4:
        return None
    xs = [o.x0 + o.size / 2 for o in objects]
    ys = [o.y0 + o.size / 2 for o in objects]
    horizontal = (max(xs) - min(xs)) >= (max(ys) - min(ys))
    if n == 4:
        order = sorted(range(n), key=lambda i: ys[i])
        order = sorted(order[:2], key=lambda i: xs[i]) + sorted(order[2:], key=lambda i: xs[i])
        cells = [(c, r) for r in range(2) for c in range(2)]
        k = 2
    else:
        order = sorted(range(n), key=lambda i: xs[i] if horizontal else ys[i])
        cells = [(i, 0) if horizontal else (0, i) for i in range(n)]
        k = n
    pitch = CANVAS / k
    out = list(objects)
    for i, (cx, cy) in zip(order, cells):
        o = objects[i]
        size = min(o.size, pitch - 2 * SAME_COLOR_GAP)
        x = (cx + 0.5) * pitch - size / 2 if (n == 4 or horizontal) else (CANVAS - size) / 2
        y = (cy + 0.5) * pitch - size / 2 if (n == 4 or not horizontal) else (CANVAS - size) / 2
        out[i] = replace(o, x0=x, y0=y, size=size)
    return out


def write_dataset(out_dir: str | Path, cfg: DataConfig) -> Path:
    """Write ``out_dir/data.jsonl`` and ``out_dir/img/*.png``; returns the JSONL path."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    side = (cfg.size, cfg.size)

    def save(im: Image.Image, name: str) -> str:
        im.resize(side, Image.Resampling.LANCZOS).save(out / "img" / name)
        return f"img/{name}"

    records = []
    for i in range(cfg.pairs):
        line = sample_line(rng, cfg.tier_fraction, cfg.max_tier, cfg.tag_list)
        objects = draw_objects(line, rng, cfg.world())
        if cfg.centre_single and len(objects) == 1:
            o = objects[0]
            objects = [replace(o, x0=(CANVAS - o.size) / 2, y0=(CANVAS - o.size) / 2)]
        canvas = render_objects(objects, rng)
        if cfg.slots and (snapped := snap_to_slots(objects)) is not None:
            slotted = render_objects(snapped, rng)
            if evaluate_image(line, detect(slotted))[0]:  # keep the snap only where the prompt still holds
                canvas = slotted
        target = save(canvas, f"t{i:06d}.png")
        records.append({"prompt": line["prompt"], "references": [], "target": target, "tag": line["tag"]})
    made = 0
    while made < cfg.edits:
        trip = edit_triplet(rng, cfg)
        if trip is None:
            continue
        prompt, before, after = trip
        records.append({"prompt": prompt, "references": [save(before, f"e{made:06d}a.png")],
                        "target": save(after, f"e{made:06d}b.png"), "tag": "edit"})
        made += 1
    path = out / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    for f, default in DataConfig.__dataclass_fields__.items():
        if isinstance(default.default, bool):
            p.add_argument(f"--{f.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default.default)
        else:
            p.add_argument(f"--{f.replace('_', '-')}", type=type(default.default), default=default.default)
    args = vars(p.parse_args(argv))
    path = write_dataset(args.pop("out_dir"), DataConfig(**args))
    print(path)


if __name__ == "__main__":
    main()
