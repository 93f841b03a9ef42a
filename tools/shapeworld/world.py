"""The fixed ShapeWorld: classes, palette, scenes, the simulation config and the layout solver.

Every object is an axis-aligned shape that fills a ``size`` x ``size`` box, so a detected box is the
object's geometry. Objects may touch but never overlap; two objects of the same colour keep a
small gap so that pixels alone separate them (this is the world's rule, not the detector's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from clvr_agent.eval.rules import COLORS, relative_position

CANVAS = 256
CLASSES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "orange": (245, 130, 20), "yellow": (240, 220, 20), "green": (30, 170, 60),
    "blue": (30, 80, 220), "purple": (130, 40, 180), "pink": (245, 130, 190), "brown": (130, 80, 30),
    "black": (15, 15, 15), "white": (250, 250, 250),
}
assert tuple(PALETTE) == tuple(COLORS)
BACKGROUND = (150, 150, 150)
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MIN_SIZE, MAX_SIZE = 24, 72
SAME_COLOR_GAP = 4.0  # px between same-coloured objects, so colour components never merge


@dataclass
class WorldConfig:
    """The simulated generator's error model (defaults are the documented benchmark setting).

    A text-to-image call corrupts each atomic constraint of the prompt independently with
    probability ``min(eps_max, eps_per_constraint * C)``, C = the prompt's number of atomic
    constraints. An edit applies each op with ``edit_success`` and disturbs one other object
    with ``edit_disturb``.
    """

    eps_per_constraint: float = 0.04
    eps_max: float = 0.9
    edit_success: float = 0.85
    edit_disturb: float = 0.05
    noise: float = 3.0  # std of the background's pixel noise
    shade: tuple[float, float] = (0.88, 1.08)  # per-object brightness factor range
    gradient: float = 0.06  # max top-to-bottom brightness change inside an object
    sizes: tuple[float, float] = (MIN_SIZE, MAX_SIZE)  # object side range in px (crowded scenes draw smaller)

    def __post_init__(self) -> None:
        for name in ("eps_per_constraint", "eps_max", "edit_success", "edit_disturb"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        lo, hi = self.sizes
        if not 8 <= lo <= hi <= CANVAS // 2:
            raise ValueError(f"sizes must satisfy 8 <= min <= max <= {CANVAS // 2}, got {self.sizes}")

    def epsilon(self, n_constraints: int) -> float:
        return min(self.eps_max, self.eps_per_constraint * n_constraints)


@dataclass
class Obj:
    cls: str
    color: str
    x0: float
    y0: float
    size: float
    shade: float = 1.0
    gradient: float = 0.0

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown class {self.cls!r}; known: {', '.join(CLASSES)}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(PALETTE)}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    noise_seed: int = 0


def box_gap(a, b) -> float:
    """Chebyshev gap between two boxes (negative when they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def relation_holds(box_a, box_b, rel: str, margin: float = 0.0) -> bool:
    """GenEval's relation of A to B, optionally demanding ``margin`` beyond the 0.5 cut."""
    if margin == 0.0:
        return rel in relative_position(box_a, box_b)
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    off = ca - cb
    rev = np.maximum(np.abs(off) - 0.1 * dims, 0) * np.sign(off)
    norm = float(np.linalg.norm(off))
    if norm < 1e-6:
        return False
    dx, dy = rev / norm
    cut = 0.5 + margin
    return {"left of": dx < -cut, "right of": dx > cut, "above": dy < -cut, "below": dy > cut}[rel]


# A relation to place: new object group ``a`` must be ``rel`` of every object in group ``b``.
Relation = tuple[int, str, int]


def layout(
    specs: list[tuple[str, str, int]],
    relations: list[Relation],
    rng: np.random.Generator,
    fixed: Optional[list[tuple[Obj, int]]] = None,
    config: WorldConfig = WorldConfig(),
    tries: int = 400,
    restarts: int = 6,
) -> Optional[list[Obj]]:
    """Place new objects ``(cls, colour, group)`` among ``fixed`` ones so every relation holds.

    Groups tie relations to objects (fixed objects carry their own group id). Returns the new
    objects in ``specs`` order, or None when no layout was found (the caller decides what then).
    """
    fixed = fixed or []
    n_total = len(specs) + len(fixed)
    # Crowded scenes draw smaller objects; each restart shrinks them further.
    lo, top_max = config.sizes
    top = float(np.clip(200.0 / np.sqrt(n_total + 1) * top_max / MAX_SIZE, min(lo + 4, top_max), top_max))
    for restart in range(restarts):
        hi = max(lo, top * (0.85 ** restart))
        placed: list[tuple[Obj, int]] = list(fixed)
        ok = True
        for cls, color, group in specs:
            obj = _place_one(cls, color, group, placed, relations, rng, hi, config, tries)
            if obj is None:
                ok = False
                break
            placed.append((obj, group))
        if ok:
            return [o for o, _ in placed[len(fixed):]]
    return None


def _place_one(cls, color, group, placed, relations, rng, hi, config, tries) -> Optional[Obj]:
    rels = [(r, other, True) for a, r, other in relations if a == group] + \
           [(r, other, False) for other, r, b in relations if b == group]
    for _ in range(tries):
        size = float(rng.uniform(config.sizes[0], hi))
        x0 = float(rng.uniform(1, CANVAS - 1 - size))
        y0 = float(rng.uniform(1, CANVAS - 1 - size))
        box = (x0, y0, x0 + size, y0 + size)
        good = True
        for o, g in placed:
            need = SAME_COLOR_GAP if o.color == color else 0.0
            if box_gap(box, o.box) < need:
                good = False
                break
            for r, other, subject in rels:
                if g != other:
                    continue
                holds = relation_holds(box, o.box, r, 0.08) if subject else relation_holds(o.box, box, r, 0.08)
                if not holds:
                    good = False
                    break
            if not good:
                break
        if good:
            lo, hi_s = config.shade
            return Obj(cls, color, x0, y0, size, shade=float(rng.uniform(lo, hi_s)),
                       gradient=float(rng.uniform(-config.gradient, config.gradient)))
    return None


def restyled(obj: Obj, rng: np.random.Generator, config: WorldConfig = WorldConfig(), **changes) -> Obj:
    """A copy with fresh shading (every re-render draws its own lighting)."""
    lo, hi = config.shade
    return replace(obj, shade=float(rng.uniform(lo, hi)),
                   gradient=float(rng.uniform(-config.gradient, config.gradient)), **changes)
