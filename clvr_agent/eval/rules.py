"""GenEval's pass rules, reproduced exactly and independent of any detector.

A detector (ShapeWorld's pixel detector, or Mask2Former on real images) turns an image into
:class:`Detection` records; :func:`evaluate_image` applies the official rules (Ghosh et al. 2023,
``evaluation/evaluate_images.py``) to them, and :func:`summarize` reproduces
``summary_scores.py``. :func:`clause_scores` splits the same verdict per clause for partial credit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1


@dataclass
class Detection:
    """One detected object: class name, box (x0, y0, x1, y1) in pixels, confidence, colour."""

    cls: str
    box: tuple[float, float, float, float]
    score: float
    color: Optional[str] = None
    mask: Optional[np.ndarray] = None  # (H, W) bool, when the detector segments


ColorFn = Callable[[Detection], str]


def relative_position(box_a, box_b) -> set[str]:
    """Position of A relative to B, factoring in object dimensions (official rule, y grows down)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_detections(tag: str, detections: Sequence[Detection]) -> dict[str, list[Detection]]:
    """Per class: confidence above the tag's threshold, best first, at most 16 (no NMS)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            by_class.setdefault(det.cls, []).append(det)
    # Equal scores keep detector order (the official argsort()[::-1] reverses them); no rule
    # depends on the order of exact ties.
    return {c: sorted(ds, key=lambda d: -d.score)[:MAX_OBJECTS] for c, ds in by_class.items()}


def _colors_of(found: list[Detection], classify_color: Optional[ColorFn]) -> list[str]:
    colors = []
    for det in found:
        if det.color is not None:
            colors.append(det.color)
        elif classify_color is not None:
            colors.append(classify_color(det))
        else:
            raise ValueError(f"detection of {det.cls!r} has no colour and no classify_color was given")
    return colors


def _judge(metadata: dict, objects: dict[str, list[Detection]], classify_color: Optional[ColorFn]):
    """The official ``evaluate``: returns (correct, reasons, per-include matched, per-exclude ok)."""
    correct = True
    reason: list[str] = []
    matched_groups: list[Optional[list[Detection]]] = []
    include_ok: list[bool] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found = objects.get(classname, [])[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors_of(found, classify_color)
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj.box, target.box)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    + f"{' and '.join(true_rels)} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
        include_ok.append(matched)
    exclude_ok: list[bool] = []
    for req in metadata.get("exclude", []):
        classname = req["class"]
        ok = len(objects.get(classname, [])) < req["count"]
        if not ok:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
        exclude_ok.append(ok)
    return correct, reason, include_ok, exclude_ok


def evaluate_image(
    metadata: dict, detections: Sequence[Detection], classify_color: Optional[ColorFn] = None
) -> tuple[bool, str]:
    """(correct, reason) for one image, exactly as GenEval's evaluator decides it.

    Colour is judged only on the selected top-``count`` objects: ``det.color`` when the detector
    set it, else ``classify_color(det)`` (the real-image evaluator passes CLIP on the crop).
    """
    objects = select_detections(metadata["tag"], detections)
    correct, reason, _, _ = _judge(metadata, objects, classify_color)
    return correct, "\n".join(reason)


def clause_scores(
    metadata: dict, detections: Sequence[Detection], classify_color: Optional[ColorFn] = None
) -> list[bool]:
    """Per clause (include clauses in order, then exclude clauses): does it hold?

    The image passes officially exactly when every entry is True.
    """
    objects = select_detections(metadata["tag"], detections)
    _, _, include_ok, exclude_ok = _judge(metadata, objects, classify_color)
    return include_ok + exclude_ok


def partial_score(
    metadata: dict, detections: Sequence[Detection], classify_color: Optional[ColorFn] = None
) -> float:
    """Fraction of clauses satisfied: the verifier's score and the RL reward."""
    scores = clause_scores(metadata, detections, classify_color)
    return sum(scores) / len(scores) if scores else 1.0


def summarize(results: Sequence[dict]) -> dict:
    """``summary_scores.py``: per-tag mean of ``correct``; overall = unweighted mean of the tag means.

    Tags appear in order of first occurrence, as pandas' ``groupby(sort=False)`` lists them. Rates are
    rounded to 6 decimals (exact for any n up to 10^6 images), so summaries print 0.715, not 0.7149999999999999.
    """
    per_tag: dict[str, list[bool]] = {}
    for r in results:
        per_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    means = {tag: float(np.mean(v)) for tag, v in per_tag.items()}
    overall = float(np.mean(list(means.values()))) if means else 0.0
    return {"overall": round(overall, 6), "per_tag": {tag: round(m, 6) for tag, m in means.items()}}


def load_official_metadata() -> list[dict]:
    """The 553 official GenEval prompts with their clauses (packaged copy of the benchmark file)."""
    text = resources.files("clvr_agent.eval").joinpath("geneval_metadata.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_object_names() -> list[str]:
    """The 80 COCO class names GenEval's detector knows."""
    text = resources.files("clvr_agent.eval").joinpath("geneval_object_names.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]
