"""PPRL's proxy teacher and R_text for ShapeWorld.

:class:`ShapeWorldTeacher` turns a loop state into an explicit step target: it reads the canvas being
edited with the ShapeWorld detector (``read_scene``, the executor's own view of a canvas), applies the
instruction (parsed by ShapeWorld's language) to what it sees, and returns the whole resulting scene as
a GenEval-phrased prompt plus the pixels to preserve: everything outside the objects the instruction
acts on. An instruction that adds or moves objects places them in free space the teacher cannot know in
advance, so then only the untouched objects are preserved (the free background may change).

:func:`shapeworld_reward` is R_text: GenEval's partial credit of the proxy scene, times a penalty for
detected objects the scene does not name.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from PIL import Image

from clvr_agent.eval.rules import partial_score, select_detections
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.executor import read_scene
from clvr_agent.tools.shapeworld.language import (
    NP,
    Item,
    Op,
    format_prompt,
    items_to_metadata,
    parse_instruction,
    parse_prompt,
)
from clvr_agent.tools.shapeworld.world import CANVAS
from clvr_agent.training.pprl_data import LoopState, ProxyPrompt

MARGIN = 4.0  # px around an object box (anti-aliasing ring, detector box error) that counts as the object


class _Thing:
    """An object of the target scene. ``origin``: its box on the edited canvas (None for a new object);
    ``color`` None when the instruction leaves it open (an add that names no colour, an ambiguous pick).
    Compared by identity (``in`` asks "this very object")."""

    def __init__(self, cls: str, color: Optional[str], origin=None):
        self.cls, self.color, self.origin = cls, color, origin


class ShapeWorldTeacher:
    """``teacher(context) -> ProxyPrompt`` for ShapeWorld loop states (and plain ShapeWorld prompts).

    Text→image steps (a prompt, a ``generate`` call, a ``redraw:``) are already explicit: the target is
    the prompt they draw, with nothing to preserve. An edit's target is the edited canvas's scene with
    the instruction applied, and its preserve mask (see the module docstring).
    """

    def __init__(self, margin: float = MARGIN):
        if margin < 0:
            raise ValueError(f"margin must be ≥ 0 px, got {margin}")
        self.margin = margin

    def __call__(self, context: Any) -> ProxyPrompt:
        if isinstance(context, str):
            return ProxyPrompt(context.split("\n")[0])
        if not isinstance(context, LoopState):
            raise TypeError(f"the ShapeWorld teacher reads prompt strings and LoopStates, got {type(context).__name__}")
        try:
            ops = parse_instruction(context.instruction)
        except ValueError as exc:
            raise ValueError(f"the ShapeWorld teacher cannot read the instruction {context.instruction!r} ({exc}); "
                             "it reads ShapeWorld loops only: use the plain proxy (--proxy plain) for others") from None
        redraws = [op for op in ops if op.kind == "redraw"]
        if context.mode == "generate" or redraws:
            return ProxyPrompt(redraws[-1].prompt if redraws else context.prompt.split("\n")[0])
        canvas = context.canvases()[-1]
        return self.edit_target(canvas, ops)

    def edit_target(self, canvas: Image.Image, ops: list[Op]) -> ProxyPrompt:
        """The scene ``ops`` make of ``canvas`` as a prompt, and the canvas pixels they must keep."""
        scale = CANVAS / canvas.width  # read_scene reads at ShapeWorld's canvas size
        seen = read_scene(canvas if canvas.size == (CANVAS, CANVAS) else
                          canvas.resize((CANVAS, CANVAS), Image.Resampling.LANCZOS))
        before = [_Thing(o.cls, o.color, tuple(v / scale for v in o.box)) for o in seen]
        things, acted, relations = list(before), [], []
        for op in ops:
            _apply(op, things, acted, relations)
        text = describe(things, relations)
        h, w = canvas.height, canvas.width
        edited = _mask((h, w), [t.origin for t in acted], self.margin)
        if any(op.kind in ("add", "move") for op in ops):
            kept = [t.origin for t in things if t.origin is not None and t not in acted]
            preserve = _mask((h, w), kept, self.margin) & ~edited
        else:
            preserve = ~edited
        return ProxyPrompt(text, [canvas], preserve)


def _apply(op: Op, things: list[_Thing], acted: list[_Thing], relations: list) -> None:
    """``op``'s effect on the scene's language: counts, colours, and which objects it may touch."""
    if op.kind == "add":
        new = [_Thing(op.target.cls, op.target.color) for _ in range(op.target.count or 1)]
        things.extend(new)
        if op.relation:
            relations.append((new, op.relation, [t for t in things if op.reference.matches(t.cls, t.color)]))
        return
    matching = [t for t in things if op.target.matches(t.cls, t.color)]
    acted.extend(t for t in matching if t.origin is not None and t not in acted)
    if op.kind == "remove":
        n = len(matching) if op.target.count is None else min(op.target.count, len(matching))
        if n < len(matching) and len({t.color for t in matching}) > 1:  # which ones go is the executor's pick
            for t in matching:
                t.color = None
        for t in matching[len(matching) - n:]:
            things.remove(t)
    elif op.kind == "recolor":
        todo = [t for t in matching if t.color != op.color]
        n = len(todo) if op.target.count is None else min(op.target.count, len(todo))
        for t in todo:
            t.color = op.color if n == len(todo) else None
    elif op.kind == "move":
        moved = matching if op.target.count is None else matching[: op.target.count]
        relations.append((moved, op.relation,
                          [t for t in things if op.reference.matches(t.cls, t.color) and t not in moved]))


def describe(things: list[_Thing], relations: list) -> str:
    """The scene as a GenEval-phrased prompt ('' for an empty canvas).

    One clause per class (GenEval's rules judge the top-``count`` objects of a class, so a class is one
    clause), its colour when all its objects share one. A relation an add or move made is kept when its
    subjects are all of their class and its referents all of theirs at the end (so GenEval's position
    rule reads exactly the objects the op placed), each class in at most one relation.
    """
    classes = list(dict.fromkeys(t.cls for t in things))
    of = {c: [t for t in things if t.cls == c] for c in classes}

    def np_of(c: str) -> NP:
        colors = {t.color for t in of[c]}
        color = colors.pop() if len(colors) == 1 else None
        return NP(c, len(of[c]), color)

    pairs: dict[str, tuple[str, str]] = {}  # subject class -> (relation, referent class)
    used: set[str] = set()
    for subjects, rel, referents in relations:
        if not subjects or not referents:
            continue
        s, r = subjects[0].cls, referents[0].cls
        same = lambda a, b: len(a) == len(b) and all(x in b for x in a)  # noqa: E731
        if s in used or r in used or s == r or not same(of.get(s, []), subjects) or not same(of.get(r, []), referents):
            continue
        pairs[s] = (rel, r)
        used |= {s, r}
    referent_of = {r for _, r in pairs.values()}
    items: list[Item] = []
    for c in classes:
        if c in pairs:
            rel, r = pairs[c]
            items.append((np_of(c), rel, np_of(r)))
        elif c not in referent_of:
            items.append((np_of(c), None, None))
    if not items:
        return ""
    line = items_to_metadata(items, "")
    return format_prompt(line)


def _mask(shape: tuple[int, int], boxes, margin: float) -> np.ndarray:
    """(H, W) bool: the pixels of ``boxes`` grown by ``margin``."""
    m = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        m[max(int(np.floor(y0 - margin)), 0): max(int(np.ceil(y1 + margin)), 0),
          max(int(np.floor(x0 - margin)), 0): max(int(np.ceil(x1 + margin)), 0)] = True
    return m


def _at_canvas_size(im: Image.Image) -> Image.Image:
    # The detector is calibrated on ShapeWorld's canvas size; a small model's samples are upscaled to it.
    return im if im.size == (CANVAS, CANVAS) else im.convert("RGB").resize((CANVAS, CANVAS), Image.Resampling.LANCZOS)


def scene_score(image: Image.Image, scene: str) -> float:
    """GenEval partial credit of ``scene`` on ``image`` × ``n / (n + extra)``: ``n`` objects named,
    ``extra`` detected beyond them per class (GenEval's rules ask for *at least*; a step target is the
    whole scene). An empty scene scores 1 on an empty canvas."""
    dets = detect(_at_canvas_size(image))
    if scene:
        line = parse_prompt(scene)
        partial, tag = partial_score(line, dets), line["tag"]
        named: dict[str, int] = {}
        for c in line["include"]:
            named[c["class"]] = named.get(c["class"], 0) + c["count"]
    else:
        partial, tag, named = 1.0, "single_object", {}
    found = select_detections(tag, dets)
    extra = sum(max(0, len(ds) - named.get(c, 0)) for c, ds in found.items())
    n = sum(named.values())
    return partial * (n / (n + extra) if n + extra else 1.0)


def shapeworld_reward(images: list[Image.Image], proxies: list[ProxyPrompt]) -> list[Optional[float]]:
    """R_text for ShapeWorld: :func:`scene_score` of each image against its proxy's scene.

    The scene is the proxy text's first line: a raw history (``plain_proxy``) is the user's prompt
    followed by instructions, and only the prompt describes a scene.
    """
    return [scene_score(im, p.text.split("\n")[0]) for im, p in zip(images, proxies)]

