"""Pixels -> detections. Sees only the image: colour clustering against the palette, connected
components per colour, then shape by geometric features (fill of the box, convexity, where the
mass sits).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from clvr_agent.eval.rules import Detection
from clvr_agent.tools.shapeworld.world import BACKGROUND, PALETTE

_NAMES = list(PALETTE)
_CENTRES = np.array([PALETTE[c] for c in _NAMES] + [BACKGROUND], dtype=np.float32)  # (11, 3)
# Objects are lit by a factor in about [0.82, 1.14]; the background is not lit.
_SCALE_LO = np.array([0.82] * len(_NAMES) + [0.95], dtype=np.float32)
_SCALE_HI = np.array([1.14] * len(_NAMES) + [1.05], dtype=np.float32)
_CONFIDENT = 42.0  # a pixel farther than this from every (lit) palette colour is an edge pixel
_MIN_AREA = 90  # the smallest object (24 px star) covers ~200 px

# Feature prototypes (fill of the box, solidity, 3 * vertical centroid offset), measured on
# renders of each class over the whole size and lighting range.
_PROTOTYPES = {
    "circle": (0.79, 0.97, 0.0),
    "square": (1.0, 1.0, 0.0),
    "triangle": (0.52, 0.95, 0.48),
    "star": (0.45, 0.645, 0.15),
    "diamond": (0.515, 0.955, 0.0),
    "cross": (0.59, 0.745, 0.0),
}
_WEIGHTS = np.array([4.0, 4.0, 2.0])
# Rendered area / size^2 and (area centroid - box centre) / size, per class (calibrated on renders).
_AREA = {"circle": 0.7852, "square": 1.0118, "triangle": 0.5075, "star": 0.4346, "diamond": 0.5049,
         "cross": 0.6044}
_CENTROID = {"circle": 0.0, "square": 0.0, "triangle": 0.1672, "star": 0.0531, "diamond": 0.0, "cross": 0.0}


def _classify_colors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, confident) for (N, 3) colours: label indexes the palette (10 = background)."""
    x = x.reshape(-1, 1, 3).astype(np.float32)  # (N, 1, 3)
    c = _CENTRES[None]  # (1, 11, 3)
    k = np.clip((x * c).sum(-1) / (c * c).sum(-1), _SCALE_LO, _SCALE_HI)  # best lighting, (N, 11)
    d = np.sqrt(((x - k[..., None] * c) ** 2).sum(-1))  # (N, 11)
    label = d.argmin(1)
    return label.astype(np.uint8), d[np.arange(len(label)), label] < _CONFIDENT


_LUT_BITS = 6
_LUT: list = []


def _lut() -> tuple[np.ndarray, np.ndarray]:
    """Colour classification of every 6-bit RGB bin, computed once per process (~0.2 s)."""
    if not _LUT:
        step = 256 >> _LUT_BITS
        centres = np.arange(step / 2, 256, step, dtype=np.float32)
        grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)
        _LUT.append(_classify_colors(grid))
    return _LUT[0]


def classify_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, confident) per pixel of an (H, W, 3) uint8 image."""
    label, conf = _lut()
    q = rgb.astype(np.int32) >> (8 - _LUT_BITS)
    idx = (q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]  # (H, W)
    return label[idx], conf[idx]


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill of box, solidity, 3 * vertical centroid offset) of a binary mask."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(len(ys))
    fill = area / ((y1 - y0) * (x1 - x0))
    off = 3.0 * ((ys.mean() + 0.5) - (y0 + y1) / 2) / (y1 - y0)
    # Hull of the pixel squares' corners, from the boundary pixels only.
    edge = mask & ~ndimage.binary_erosion(mask)
    ey, ex = np.nonzero(edge)
    pts = np.concatenate([np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    try:
        hull = ConvexHull(pts)
        solidity = area / hull.volume
    except QhullError:
        solidity = 1.0
    return fill, min(solidity, 1.0), off


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(class, confidence) from the mask's geometry: nearest prototype, confidence by margin."""
    f = np.array(shape_features(mask))
    dists = {c: float(np.sqrt(((_WEIGHTS * (f - np.array(p))) ** 2).sum())) for c, p in _PROTOTYPES.items()}
    order = sorted(dists, key=dists.get)
    best, second = order[0], order[1]
    ratio = dists[best] / (dists[second] + 1e-9)
    return best, float(np.clip(0.995 - 0.6 * ratio**2, 0.05, 0.995))


def _coverage(rgb: np.ndarray, label: np.ndarray, conf: np.ndarray, core: np.ndarray, ci: int) -> np.ndarray:
    """Sub-pixel coverage (0..1) of one object over its window: 1 inside, projected on the edge ring."""
    col = _CENTRES[ci]
    x = rgb.astype(np.float32)
    # The object's lighting, from its confident interior.
    inner = ndimage.binary_erosion(core, iterations=1)
    inner = inner if inner.any() else core
    k = float(np.median((x[inner] @ col) / (col @ col)))
    d = k * col - _CENTRES[-1]
    alpha = np.clip(((x - _CENTRES[-1]) @ d) / (d @ d), 0.0, 1.0)
    ring = ndimage.binary_dilation(core, iterations=2) & ~inner
    other = conf & (label != ci) & (label != len(_NAMES))  # confidently another object
    return np.where(inner, 1.0, np.where(ring & ~other, alpha, 0.0))


def detect(image: Image.Image) -> list[Detection]:
    """Every object in the image, with class, box, confidence and palette colour.

    The box is the object's geometry recovered at sub-pixel precision from its coverage (area and
    centroid), so a scene read back from pixels re-renders without drift.
    """
    rgb = np.asarray(image.convert("RGB"))
    label, conf = classify_pixels(rgb)
    h, w = label.shape
    out: list[Detection] = []
    for ci, color in enumerate(_NAMES):
        mask = conf & (label == ci)
        if mask.sum() < _MIN_AREA:
            continue
        # Work inside the colour's bounding box; offsets (oy, ox) map back to the image.
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        oy, ox = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
        crop = mask[oy : rows[-1] + 2, ox : cols[-1] + 2]
        # Opening drops the thin rings of mixed colour that anti-aliasing leaves around objects.
        core = ndimage.binary_opening(crop, structure=np.ones((3, 3), bool))
        comps = np.zeros(mask.shape, np.int32)
        comps[oy : oy + crop.shape[0], ox : ox + crop.shape[1]], _ = ndimage.label(core)
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None or (comps[sl] == i).sum() < _MIN_AREA:
                continue
            ys, xs = sl
            y0, y1 = max(ys.start - 4, 0), min(ys.stop + 4, h)
            x0, x1 = max(xs.start - 4, 0), min(xs.stop + 4, w)
            local = comps[y0:y1, x0:x1] == i
            # Give back the thin parts (star tips) the opening removed.
            obj = ndimage.binary_dilation(local, iterations=2) & mask[y0:y1, x0:x1]
            cls, score = classify_shape(obj)
            alpha = _coverage(rgb[y0:y1, x0:x1], label[y0:y1, x0:x1], conf[y0:y1, x0:x1], obj, ci)
            area = float(alpha.sum())
            gy, gx = np.mgrid[y0:y1, x0:x1]
            cx = float((alpha * (gx + 0.5)).sum() / area)
            cy = float((alpha * (gy + 0.5)).sum() / area)
            size = float(np.sqrt(area / _AREA[cls]))
            cy -= _CENTROID[cls] * size
            box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
            full = np.zeros(mask.shape, bool)
            full[y0:y1, x0:x1] = obj
            out.append(Detection(cls=cls, box=box, score=score, color=color, mask=full))
    return out
