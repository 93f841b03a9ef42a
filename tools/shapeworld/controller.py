"""The ``shapeworld`` controller: plans from the prompt text, verifies and corrects from pixels.

It never sees the executor's scene: everything it knows about a canvas comes from
:func:`~clvr_agent.tools.shapeworld.detect.detect` on the image, judged by GenEval's rules.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Optional

from PIL import Image

from clvr_agent.eval.rules import (
    COUNTING_THRESHOLD,
    THRESHOLD,
    Detection,
    clause_scores,
    evaluate_image,
    relative_position,
    select_detections,
)
from clvr_agent.errors import ControllerOutputError
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.language import NP, Op, format_instruction, parse_instruction, parse_prompt
from clvr_agent.tools.shapeworld.world import OPPOSITE, PLURALS, box_gap
from clvr_agent.types import (
    Constraint,
    ConstraintResult,
    Correction,
    PassiveCheck,
    Plan,
    Region,
    Step,
    Verdict,
)


def _line(prompt: str) -> dict:
    try:
        return parse_prompt(prompt)
    except ValueError as exc:
        raise ControllerOutputError(f"the ShapeWorld controller only reads ShapeWorld prompts: {exc}") from exc


def clause_constraints(line: dict) -> list[Constraint]:
    """One checklist item per GenEval clause: include clauses c0.., then exclude clauses x0.."""
    out = []
    for i, c in enumerate(line["include"]):
        text = NP(c["class"], c["count"], c.get("color")).text()
        kind = "presence"
        if c["count"] > 1:
            kind = "count"
        if "color" in c:
            kind = "color"
        if "position" in c:
            rel, ref = c["position"]
            r = line["include"][ref]
            text += f" {rel} {NP(r['class'], r['count'], r.get('color')).text()}"
            kind = "relation"
        out.append(Constraint(id=f"c{i}", text=text, kind=kind))
    for j, c in enumerate(line.get("exclude", [])):
        many = PLURALS.get(c["class"], c["class"] + "s")
        text = f"no {many}" if c["count"] == 1 else f"fewer than {c['count']} {many}"
        out.append(Constraint(id=f"x{j}", text=text, kind="absence"))
    return out


def steps_not_executed(history: list[Step], mode: str) -> str:
    """The instruction of a ``mode`` step this run accepted although its passive check failed, or "".

    The graph retries an unexecuted step with new seeds and then accepts it as it is, so such a
    step means the executor failed that kind of step on every try: asking for more wastes calls.
    """
    for s in history:
        if s.accepted and s.request.mode == mode and s.passive is not None and not s.passive.executed:
            return s.instruction
    return ""


# A lone object drawn into a tile fills about this fraction of its side (clvr-mini's training canvases:
# 96-128 px objects on 256 px); the tile is chosen so that an object of that size there satisfies the op.
TILE_FILL = 0.45
MIN_TILE = 40


def clear_tile(op: Op, dets: list[Detection], size: tuple[int, int], step: int = 8) -> Optional[Region]:
    """The largest square tile that touches no detected object and where a centred object of
    ``TILE_FILL`` of its side stands in ``op``'s relation to every matching reference; None if none.
    Pasting a freshly drawn tile there cannot clip an object already on the canvas."""
    w, h = size
    boxes = [d.box for d in dets if d.score > THRESHOLD]
    refs = [d.box for d in dets if d.score > THRESHOLD and op.relation and op.reference.matches(d.cls, d.color)]
    for side in range(min(w, h), MIN_TILE - 1, -step):
        inset = side * (1 - TILE_FILL) / 2
        for y in range(0, h - side + 1, step):
            for x in range(0, w - side + 1, step):
                tile = (x, y, x + side, y + side)
                if any(box_gap(tile, b) < 1 for b in boxes):
                    continue
                inner = (x + inset, y + inset, x + side - inset, y + side - inset)
                if all(op.relation in relative_position(inner, r) for r in refs):
                    return Region(x0=x, y0=y, x1=x + side, y1=y + side)
    return None


class ShapeWorldController:
    """Plans, verifies and corrects ShapeWorld prompts exactly (GenEval's rules on detections).

    ``redraw_fraction``: redraw from the prompt (once per run) when more than this fraction of
    clauses fail and the repair would take at least as many ops as the prompt has clauses. Once an
    edit has failed its passive check on every retry, the executor is taken not to edit: missing
    objects are then added by region draws (``clear_tile``) and everything else is redrawn.
    ``region_draws=False`` never asks for a region draw, so a loop measured with it gains only by the
    executor's own edits and redraws (how the learned-edit rows of clvr-mini's table are measured).
    """

    name = "shapeworld"

    def __init__(self, redraw_fraction: float = 0.5, region_draws: bool = True) -> None:
        if not 0.0 <= redraw_fraction <= 1.0:
            raise ValueError(f"redraw_fraction must be in [0, 1], got {redraw_fraction}")
        self.redraw_fraction = redraw_fraction
        self.region_draws = region_draws
        self._seen: dict[bytes, list[Detection]] = {}  # detections of recent canvases, by pixels

    def _detect(self, image: Image.Image) -> list[Detection]:
        """Detections of a canvas; a canvas judged twice (verify, then correct) is read once."""
        key = hashlib.sha1(image.tobytes()).digest()
        if key not in self._seen:
            if len(self._seen) >= 8:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = detect(image)
        return self._seen[key]

    def plan(self, prompt: str) -> Plan:
        line = _line(prompt)
        return Plan(constraints=clause_constraints(line), first_instruction=prompt.strip(),
                    reasoning=f"{line['tier']} atomic constraints in {len(line['include'])} clauses ({line['tag']})")

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        line = _line(prompt)
        dets = self._detect(canvas)
        correct, reason = evaluate_image(line, dets)
        oks = clause_scores(line, dets)
        found = select_detections(line["tag"], dets)
        results = []
        for con, ok in zip(clause_constraints(line), oks):
            detail = ""
            if not ok:
                cls = (line["include"] + line.get("exclude", []))[int(con.id[1:]) + (
                    len(line["include"]) if con.id[0] == "x" else 0)]["class"]
                seen = Counter(d.color for d in found.get(cls, []))
                listing = ", ".join(f"{n} {c}" for c, n in seen.items()) or "none"
                detail = f"unmet: {con.text} (found {cls}: {listing})"
            results.append(ConstraintResult(id=con.id, satisfied=ok, detail=detail))
        score = sum(oks) / len(oks) if oks else 1.0
        return Verdict(satisfied=correct, score=score, constraints=results,
                       summary=reason.replace("\n", "; ") if reason else "every clause holds")

    def correct(
        self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]
    ) -> Correction:
        line = _line(prompt)
        dets = self._detect(canvas)
        oks = clause_scores(line, dets)
        failing = oks.count(False)
        ops = repair_ops(line, dets)
        # A fresh draw is tried at most once: on a complex prompt it rarely lands better than an edit.
        # Unless the passive track has shown that this executor does not carry out edits: then a
        # missing object is drawn alone into a clear tile (until a region draw fails too), and every
        # other correction is a fresh draw (the loop keeps the best canvas it has seen).
        redrawn = any(s.instruction.startswith("redraw:") for s in history)
        mostly_wrong = failing > self.redraw_fraction * len(oks) and len(ops) >= len(line["include"])
        stuck = steps_not_executed(history, "edit")
        if stuck and self.region_draws and not steps_not_executed(history, "inpaint"):
            region = self._region_add(ops, dets, canvas.size)
            if region is not None:
                return region
        if not ops or (mostly_wrong and not redrawn) or stuck:
            why = (f"an earlier edit was not carried out ({stuck}); only a fresh draw can still help" if stuck
                   else f"{failing} of {len(oks)} clauses fail; drawing afresh is the shorter fix")
            return Correction(instruction=f"redraw: {line['prompt']}", mode="generate", reasoning=why)
        return Correction(instruction=format_instruction(ops), mode="edit",
                          reasoning=f"{failing} of {len(oks)} clauses fail; {len(ops)} op(s) fix them")

    def _region_add(self, ops: list[Op], dets: list[Detection], size: tuple[int, int]) -> Optional[Correction]:
        """The first ``add`` of ``ops`` as one object drawn into a clear tile, or None when none fits."""
        add = next((op for op in ops if op.kind == "add"), None)
        if add is None:
            return None
        one = Op("add", NP(add.target.cls, 1, add.target.color), add.relation, add.reference)
        tile = clear_tile(one, dets, size)
        if tile is None:
            return None
        return Correction(
            instruction=format_instruction([one]), mode="inpaint", region=tile,
            region_prompt=f"a photo of {NP(one.target.cls, 1, one.target.color).text()}",
            reasoning=f"whole-canvas edits are not carried out here; drawing {one.target.text()} alone into a "
                      f"clear {tile.x1 - tile.x0} px tile instead",
        )

    def check_step(self, instruction: str, before: Optional[Image.Image], after: Image.Image) -> PassiveCheck:
        a = [d for d in self._detect(after) if d.score > THRESHOLD]
        if before is None:  # a fresh drawing: it executed if it drew anything
            return PassiveCheck(executed=bool(a), detail=f"drew {_objects(len(a))}")
        try:
            ops = parse_instruction(instruction)
        except ValueError as exc:  # an edit it cannot read cannot be checked: say so, never pass it unchecked
            raise ControllerOutputError(
                f"cannot check the edit {instruction!r}: not a ShapeWorld instruction ({exc})") from None
        if any(op.kind == "redraw" for op in ops):
            return PassiveCheck(executed=bool(a), detail=f"drew {_objects(len(a))}")
        b = [d for d in self._detect(before) if d.score > THRESHOLD]
        missed = [op.text() for op in ops if not _took_effect(op, b, a)]
        if missed:
            return PassiveCheck(executed=False, detail="did not happen: " + "; ".join(missed))
        return PassiveCheck(executed=True, detail=f"{len(ops)} op(s) took effect")


def _objects(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _count(dets: list[Detection], np_: NP) -> int:
    return sum(np_.matches(d.cls, d.color) for d in dets)


def _holds(subjects: list[Detection], refs: list[Detection], rel: str) -> bool:
    return all(rel in relative_position(s.box, r.box) for s in subjects for r in refs)


def _took_effect(op: Op, before: list[Detection], after: list[Detection]) -> bool:
    t = op.target
    if op.kind == "add":
        if _count(after, t) < _count(before, t) + (t.count or 1):
            return False
        if op.relation:
            refs = [d for d in after if op.reference.matches(d.cls, d.color)]
            placed = [d for d in after if t.matches(d.cls, d.color) and _holds([d], refs, op.relation)]
            return not refs or len(placed) >= (t.count or 1)
        return True
    if op.kind == "remove":
        n_before = _count(before, t)
        n = n_before if t.count is None else min(t.count, n_before)
        return n_before > 0 and _count(after, t) <= n_before - n
    if op.kind == "recolor":
        target = NP(t.cls, None, op.color)
        candidates = sum(t.matches(d.cls, d.color) and d.color != op.color for d in before)
        n = candidates if t.count is None else min(t.count, candidates)
        return _count(after, target) >= _count(before, target) + n
    if op.kind == "move":
        subjects = [d for d in after if t.matches(d.cls, d.color)]
        refs = [d for d in after if op.reference.matches(d.cls, d.color) and d not in subjects]
        return bool(subjects) and _holds(subjects, refs, op.relation)
    return True


def repair_ops(line: dict, detections: list[Detection]) -> list[Op]:
    """The smallest chain of edits that makes every failing clause hold, judged on detections.

    Per failing clause, in clause order (referents before subjects): remove extras beyond an
    exclusion, recolour wrong colours, move misplaced objects, add what is missing.
    """
    threshold = COUNTING_THRESHOLD if line["tag"] == "counting" else THRESHOLD
    found: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold:
            found.setdefault(d.cls, []).append(d)
    include, exclude = line["include"], line.get("exclude", [])
    oks = clause_scores(line, detections)
    limit = {c["class"]: c["count"] - 1 for c in exclude}
    bad_classes = {c["class"] for c, ok in zip(exclude, oks[len(include):]) if not ok}
    # Which later clause relates to each clause (so a missing referent is added in the right place).
    subject_of = {c["position"][1]: j for j, c in enumerate(include) if "position" in c}
    ops: list[Op] = []
    for i, clause in enumerate(include):
        k, n, color = clause["class"], clause["count"], clause.get("color")
        if oks[i] and k not in bad_classes:
            continue
        have = list(found.get(k, []))
        rel = ref_np = None
        if "position" in clause:
            rel, ref_i = clause["position"]
            ref_np = NP(include[ref_i]["class"], None, None)
        refs = found.get(ref_np.cls, []) if ref_np else []

        def badness(d: Detection) -> int:
            return (color is not None and d.color != color) * 2 + (rel is not None and not _holds([d], refs, rel))

        # 1. Too many for the exclusion: remove the worst, named by colour.
        if k in limit and len(have) > limit[k]:
            worst = sorted(have, key=badness, reverse=True)[: len(have) - limit[k]]
            for c, m in Counter(d.color for d in worst).items():
                ops.append(Op("remove", NP(k, m, c)))
            have = [d for d in have if d not in worst]
        # 2. Wrong colours among the rest.
        if color is not None:
            for c, m in Counter(d.color for d in have if d.color != color).items():
                ops.append(Op("recolor", NP(k, m, c), color=color))
        # 3. Misplaced objects: move every object of the class beside the references.
        if rel is not None and refs and have and not _holds(have, refs, rel):
            ops.append(Op("move", NP(k, None, None), rel, ref_np))
        # 4. Missing objects: add them (a missing referent goes beside its existing subject).
        missing = n - len(have)
        if missing > 0:
            if rel is not None and refs:
                ops.append(Op("add", NP(k, missing, color), rel, ref_np))
            elif i in subject_of and found.get(include[subject_of[i]]["class"]):
                subj = include[subject_of[i]]
                ops.append(Op("add", NP(k, missing, color), OPPOSITE[subj["position"][0]], NP(subj["class"], None, None)))
            elif rel is not None:
                ops.append(Op("add", NP(k, missing, color), rel, ref_np))
            else:
                ops.append(Op("add", NP(k, missing, color)))
    return ops
