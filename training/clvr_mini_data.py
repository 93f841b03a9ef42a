"""ShapeWorld training data for clvr-mini, written as the diffusion trainers' JSONL + PNGs.

Two kinds of record, both ``{"prompt", "references": [png], "target": png}``:

* text→image pairs: a prompt from the GenEval-style generator (the six tags) or the tier generator
  (1..``max_tier`` atomic constraints), drawn *correctly* by the ShapeWorld world (no error model);
* edit examples: the loop's own first edit (:func:`edit_example`). Canvases drawn with the world's
  error model (raised so that most are wrong) and run through the loop's steps until the ShapeWorld
  controller asks for an edit; the record is the request the graph builds for it (accumulated prompt,
  the canvases so far as references) and the edited canvas's own scene with the instruction applied:
  the same objects, shading and background noise wherever the instruction does not act, so "keep the
  rest" is a pixel copy. A prompt whose canvas is already right asks for no edit and yields none.

and prior-only records ``{"prompt", "prior_only": true}``: a prompt of the same mix with nothing drawn,
on which SFT regresses only the frozen base's velocity (``prior_weight``), so the base keeps drawing it.

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

from clvr_agent.eval.rules import TAGS, evaluate_image
from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor, apply_op
from clvr_agent.tools.shapeworld.language import geneval_line, parse_instruction, tier_line
from clvr_agent.tools.shapeworld.render import render
from clvr_agent.tools.shapeworld.world import CANVAS, MAX_SIZE, MIN_SIZE, SAME_COLOR_GAP, Obj, Scene, WorldConfig, restyled
from clvr_agent.training.loop_edits import first_edit

EXACT = WorldConfig(eps_per_constraint=0.0, edit_success=1.0, edit_disturb=0.0)


@dataclass
class DataConfig:
    """How many records of each kind, and the prompt mix."""

    pairs: int = 4000
    edits: int = 0
    prior_prompts: int = 0  # prior-only records: prompts of the same mix (tier_fraction, tags), no target
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
        if min(self.pairs, self.edits, self.prior_prompts) < 0 or self.pairs + self.edits + self.prior_prompts == 0:
            raise ValueError("pairs, edits and prior_prompts must be ≥ 0 and not all 0")
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


@dataclass
class EditExample:
    """One step of the loop's own editing: what the executor is asked, and the exact answer."""

    prompt: str  # the accumulated prompt the graph builds for the edit
    references: list[Image.Image]  # the canvases the graph passes, oldest first; the last is the one edited
    target: Image.Image  # the last reference with the instruction applied and nothing else changed
    instruction: str  # the ShapeWorld controller's correction, verbatim
    ops: list[str]  # the op kinds of the instruction (add, remove, recolor, move)
    changed: list[tuple[float, float, float, float]]  # 256 px boxes of the objects the edit removed, moved or added


def edit_example(rng: np.random.Generator, cfg: DataConfig, controller: ShapeWorldController) -> Optional[EditExample]:
    """The loop's first edit on a prompt, drawn by the world with ``cfg.edit_error``, answered exactly.

    The loop is run as the graph runs it (:func:`~clvr_agent.training.loop_edits.first_edit`): draw,
    verify, maybe one redraw, then the controller's edit instruction. The target is the edited canvas's
    own scene with the instruction applied: every object the instruction does not name keeps its place,
    shading and drawing order and the background keeps its noise, so the target differs from the
    reference only inside the boxes of the objects the edit touched (plus the 1 px anti-aliasing
    fringe of a box). ``None`` when no edit was asked (the draw was right), an op found no room, the
    op had to move an object it does not name, or the controller's passive check would not pass the target.
    """
    line = sample_line(rng, cfg.tier_fraction, cfg.max_tier, cfg.tag_list)
    world = cfg.world(cfg.edit_error)
    scenes: list[Scene] = []

    def draw(request) -> Image.Image:  # the first draw and a redraw both draw the prompt
        scenes.append(Scene(draw_objects(line, rng, world), noise_seed=int(rng.integers(2**31))))
        return render(scenes[-1])

    asked = first_edit(line["prompt"], 0, draw, controller)
    if asked is None:
        return None
    before = scenes[-1]  # the canvas being edited is the last one drawn
    ops = parse_instruction(asked.correction.instruction)
    edited = list(before.objects)
    for op in ops:
        if not apply_op(op, edited, rng, cfg.world()):
            return None
    gone = [o for o in before.objects if not any(o is e for e in edited)]
    new = [e for e in edited if not any(e is o for o in before.objects)]
    named = [op.target for op in ops if op.kind != "add"]
    if not all(any(t.matches(o.cls, o.color) for t in named) for o in gone):
        return None  # "no room beside the references: move them too" moves objects the instruction does not name
    target = render(Scene(edited, noise_seed=before.noise_seed))
    refs = asked.references()
    if not controller.check_step(asked.correction.instruction, refs[-1], target).executed:
        return None
    return EditExample(asked.request.accumulated_prompt, refs, target, asked.correction.instruction,
                       [op.kind for op in ops], [o.box for o in gone + new])


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
    controller = ShapeWorldController()
    made = 0
    while made < cfg.edits:
        ex = edit_example(rng, cfg, controller)
        if ex is None:
            continue
        refs = [save(im, f"e{made:06d}r{j}.png") for j, im in enumerate(ex.references)]
        records.append({"prompt": ex.prompt, "references": refs, "target": save(ex.target, f"e{made:06d}t.png"),
                        "tag": "edit", "instruction": ex.instruction, "ops": ex.ops})
        made += 1
    for _ in range(cfg.prior_prompts):
        line = sample_line(rng, cfg.tier_fraction, cfg.max_tier, cfg.tag_list)
        records.append({"prompt": line["prompt"], "prior_only": True, "tag": line["tag"]})
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
