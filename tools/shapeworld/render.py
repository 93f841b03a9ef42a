"""Scene -> 256x256 RGB image, anti-aliased by drawing each shape at 4x and box-filtering down."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from clvr_agent.tools.shapeworld.world import BACKGROUND, CANVAS, PALETTE, Obj, Scene

SUPERSAMPLE = 4
STAR_INNER = 0.5  # inner/outer radius of the five-pointed star
CROSS_ARM = 0.36  # arm width of the cross, as a fraction of its size


def _unit_polygon(cls: str) -> list[tuple[float, float]]:
    """The shape's outline in the unit box [0, 1]^2, y down (circles are drawn as ellipses)."""
    if cls == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if cls == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if cls == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if cls == "cross":
        a, b = (1 - CROSS_ARM) / 2, (1 + CROSS_ARM) / 2
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if cls == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else STAR_INNER
            t = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(t), r * math.sin(t)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]
    raise ValueError(f"no outline for class {cls!r}")


def _alpha(obj: Obj) -> tuple[int, int, np.ndarray]:
    """Coverage of the object over the pixel patch it touches: (px0, py0, (h, w) float alpha)."""
    px0, py0 = int(math.floor(obj.x0)) - 1, int(math.floor(obj.y0)) - 1
    px1, py1 = int(math.ceil(obj.x0 + obj.size)) + 1, int(math.ceil(obj.y0 + obj.size)) + 1
    w, h = px1 - px0, py1 - py0
    s = SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy = (obj.x0 - px0) * s, (obj.y0 - py0) * s
    span = obj.size * s
    if obj.cls == "circle":
        draw.ellipse([ox, oy, ox + span - 1, oy + span - 1], fill=255)
    else:
        draw.polygon([(ox + u * span, oy + v * span) for u, v in _unit_polygon(obj.cls)], fill=255)
    alpha = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float32) / 255.0
    return px0, py0, alpha


def render(scene: Scene, noise: float = 3.0) -> Image.Image:
    """Draw the scene in list order on a grey, lightly noisy background."""
    rng = np.random.default_rng(scene.noise_seed)
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    if noise > 0:
        canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    for obj in scene.objects:
        px0, py0, alpha = _alpha(obj)
        h, w = alpha.shape
        # Clip the patch to the canvas.
        cx0, cy0 = max(px0, 0), max(py0, 0)
        cx1, cy1 = min(px0 + w, CANVAS), min(py0 + h, CANVAS)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        a = alpha[cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0, None]
        # Lighting: a brightness factor and a vertical gradient across the object.
        rows = (np.arange(cy0, cy1, dtype=np.float32) - (obj.y0 + obj.size / 2)) / max(obj.size / 2, 1.0)
        light = obj.shade * (1.0 + obj.gradient * np.clip(rows, -1, 1))
        color = np.array(PALETTE[obj.color], dtype=np.float32)[None, None, :] * light[:, None, None]
        region = canvas[cy0:cy1, cx0:cx1]
        canvas[cy0:cy1, cx0:cx1] = region * (1 - a) + color * a
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
