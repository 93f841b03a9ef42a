"""The ``shapeworld`` executor: a simulated single-step generator with a complexity ceiling.

This is a simulation, not a model. Text -> image lays out the prompt's scene and corrupts each
atomic constraint independently with probability eps = min(0.9, 0.04 * C) (drop or swap an object,
count +-1, wrong colour, flipped relation). An edit reads the scene back from the reference pixels
with the detector, applies each op with probability 0.85, and with probability 0.05 disturbs one
other object. Everything is seeded by ``request.seed`` and the instruction, so calls reproduce.
"""

from __future__ import annotations

import time
import zlib
from typing import Optional

import numpy as np
from PIL import Image

from clvr_agent.eval.rules import COLORS, THRESHOLD
from clvr_agent.protocols import GenerationOutput, ProgressFn
from clvr_agent.errors import Cancelled
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.language import Op, count_constraints, parse_instruction, parse_prompt
from clvr_agent.tools.shapeworld.render import render
from clvr_agent.tools.shapeworld.world import (
    CANVAS,
    CLASSES,
    OPPOSITE,
    SAME_COLOR_GAP,
    Obj,
    Scene,
    WorldConfig,
    box_gap,
    layout,
    restyled,
)
from clvr_agent.types import ExecutorRequest


class ShapeWorldExecutor:
    name = "shapeworld"

    def __init__(self, config: Optional[WorldConfig] = None, *, latency_s: float = 0.0, denoise_steps: int = 1) -> None:
        """``latency_s`` rehearses a real model's wall time per call (spread over ``denoise_steps``
        progress reports, cancellable between them): for server timeouts, cancel and concurrency
        checks without a GPU. The drawing itself is unchanged."""
        if latency_s < 0 or denoise_steps < 1:
            raise ValueError("latency_s must be >= 0 and denoise_steps >= 1")
        self.config = config or WorldConfig()
        self.latency_s, self.denoise_steps = float(latency_s), int(denoise_steps)

    def generate(
        self,
        request: ExecutorRequest,
        references: list[Image.Image],
        progress: Optional[ProgressFn] = None,
    ) -> GenerationOutput:
        t0 = time.perf_counter()
        ops = parse_instruction(request.instruction)
        rng = np.random.default_rng([request.seed % 2**32, zlib.crc32(request.instruction.encode())])
        fresh = request.mode == "generate" or ops[0].kind == "redraw"
        if fresh or not references:
            objects: list[Obj] = []
        else:
            objects = read_scene(references[-1])
        applied = []
        for i, op in enumerate(ops):
            if op.kind == "redraw":
                # A fresh drawing is the generator's own attempt, not an edit: it always happens.
                objects = self.draw(parse_prompt(op.prompt), rng)
                applied.append(True)
                continue
            ok = rng.random() < self.config.edit_success
            applied.append(bool(ok and apply_op(op, objects, rng, self.config)))
        if not fresh and objects and rng.random() < self.config.edit_disturb:
            disturb(objects, ops, rng, self.config)
        for i in range(1, self.denoise_steps + 1):
            if self.latency_s:
                time.sleep(self.latency_s / self.denoise_steps)
            if progress is not None and progress(i, self.denoise_steps):
                raise Cancelled("cancelled by the progress callback")
        scene = Scene([restyled(o, rng, self.config) for o in objects], noise_seed=int(rng.integers(2**31)))
        image = render(scene, noise=self.config.noise)
        return GenerationOutput(image=image, nfe=1, seconds=time.perf_counter() - t0,
                                info={"applied": applied, "objects": len(objects)})

    def draw(self, line: dict, rng: np.random.Generator) -> list[Obj]:
        """Text -> scene with each atomic constraint corrupted independently with probability eps."""
        eps = self.config.epsilon(count_constraints(line))
        hit = lambda: rng.random() < eps  # noqa: E731
        prompt_classes = {c["class"] for c in line["include"]}
        strangers = [c for c in CLASSES if c not in prompt_classes]
        specs: list[tuple[str, str, int]] = []
        relations = []
        for g, clause in enumerate(line["include"]):
            n = clause["count"]
            if n > 1 and hit():  # the exact count
                n += 1 if rng.random() < 0.5 else -1
            members = [clause["class"]] * n
            for _ in range(clause["count"]):  # one presence per required object
                if hit() and members:
                    members.pop()
                    if strangers and rng.random() < 0.5:
                        specs.append((str(rng.choice(strangers)), str(rng.choice(COLORS)), -1))
            colors = [clause.get("color") or str(rng.choice(COLORS)) for _ in members]
            if "color" in clause and colors and hit():
                wrong = [c for c in COLORS if c != clause["color"]]
                colors[int(rng.integers(len(colors)))] = str(rng.choice(wrong))
            specs += [(cls, col, g) for cls, col in zip(members, colors)]
            if "position" in clause:
                rel, ref = clause["position"]
                relations.append((g, OPPOSITE[rel] if hit() else rel, ref))
        # Referents come before their subjects in GenEval's clause order, so they are placed first.
        objects = layout(specs, relations, rng, config=self.config)
        if objects is None:  # too crowded for every relation: draw it anyway (a generator error)
            objects = layout(specs, [], rng, config=self.config) or []
        return objects


def read_scene(image: Image.Image) -> list[Obj]:
    """The scene as the detector sees it in the pixels (the executor's only view of a canvas)."""
    objects = []
    for d in detect(image):
        if d.score > THRESHOLD:
            x0, y0, x1, y1 = d.box
            objects.append(Obj(d.cls, d.color, x0, y0, x1 - x0))
    return objects


def _fits(obj: Obj, others: list[Obj]) -> bool:
    x0, y0, x1, y1 = obj.box
    if x0 < 0 or y0 < 0 or x1 > CANVAS or y1 > CANVAS:
        return False
    return all(box_gap(obj.box, o.box) >= (SAME_COLOR_GAP if o.color == obj.color else 0.0)
               for o in others if o is not obj)


def _pick(target, objects: list[Obj], rng: np.random.Generator, prefer=None) -> list[Obj]:
    """The objects an NP names: all that match for ``the``, else ``count`` of them."""
    matching = [o for o in objects if target.matches(o.cls, o.color)]
    if target.count is None:
        return matching
    order = list(rng.permutation(len(matching)))
    if prefer is not None:
        order.sort(key=lambda i: not prefer(matching[i]))
    return [matching[i] for i in order[: target.count]]


def apply_op(op: Op, objects: list[Obj], rng: np.random.Generator, config: WorldConfig) -> bool:
    """Apply one edit in place; False when there was nothing to apply it to or no room."""
    if op.kind == "add":
        n = op.target.count or 1
        refs = [o for o in objects if op.reference and op.reference.matches(o.cls, o.color)]
        fixed = [(o, 2 if o in refs else 0) for o in objects]
        specs = [(op.target.cls, op.target.color or str(rng.choice(COLORS)), 1) for _ in range(n)]
        relations = [(1, op.relation, 2)] if refs else []
        new = layout(specs, relations, rng, fixed=fixed, config=config)
        if new is None and refs:  # no room beside the references where they are: move them too
            others = [o for o in objects if o not in refs]
            new_all = layout([(o.cls, o.color, 2) for o in refs] + specs, relations, rng,
                             fixed=[(o, 0) for o in others], config=config)
            if new_all is None:
                return False
            objects[:] = others + new_all
            return True
        if new is None:
            return False
        objects.extend(new)
        return True
    if op.kind == "remove":
        chosen = _pick(op.target, objects, rng)
        for o in chosen:
            objects.remove(o)
        return bool(chosen)
    if op.kind == "recolor":
        chosen = _pick(op.target, objects, rng, prefer=lambda o: o.color != op.color)
        for o in chosen:
            i = objects.index(o)
            objects[i] = restyled(o, rng, config, color=op.color)
            if not _fits(objects[i], objects):  # now too close to a same-coloured neighbour
                moved = layout([(o.cls, op.color, 1)], [], rng, fixed=[(x, 0) for x in objects if x is not objects[i]],
                               config=config)
                if moved is None:
                    objects[i] = o
                    return False
                objects[i] = moved[0]
        return bool(chosen)
    if op.kind == "move":
        chosen = _pick(op.target, objects, rng)
        refs = [o for o in objects if op.reference.matches(o.cls, o.color) and o not in chosen]
        if not chosen:
            return False
        rest = [o for o in objects if o not in chosen]
        specs = [(o.cls, o.color, 1) for o in chosen]
        new = layout(specs, [(1, op.relation, 2)] if refs else [], rng,
                     fixed=[(o, 2 if o in refs else 0) for o in rest], config=config)
        if new is None and refs:  # no room beside the references where they are: move them too
            others = [o for o in rest if o not in refs]
            new_all = layout([(o.cls, o.color, 2) for o in refs] + specs, [(1, op.relation, 2)], rng,
                             fixed=[(o, 0) for o in others], config=config)
            if new_all is None:
                return False
            objects[:] = others + new_all
            return True
        if new is None:
            return False
        objects[:] = rest + new
        return True
    raise ValueError(f"cannot apply op kind {op.kind!r}")


def disturb(objects: list[Obj], ops: list[Op], rng: np.random.Generator, config: WorldConfig) -> None:
    """The edit's side effect: one object the instruction did not name changes colour or moves."""
    named = {op.target.cls for op in ops if op.target is not None}
    named |= {op.reference.cls for op in ops if op.reference is not None}
    victims = [o for o in objects if o.cls not in named] or objects
    v = victims[int(rng.integers(len(victims)))]
    i = objects.index(v)
    rest = [(o, 0) for o in objects if o is not v]
    if rng.random() < 0.5:
        recolored = restyled(v, rng, config, color=str(rng.choice([c for c in COLORS if c != v.color])))
        if _fits(recolored, objects):
            objects[i] = recolored
        return
    new = layout([(v.cls, v.color, 1)], [], rng, fixed=rest, config=config)
    if new is not None:
        objects[i] = new[0]
