"""ShapeWorld's two languages: GenEval-phrased prompts (-> GenEval metadata lines) and edit
instructions (``add``/``remove``/``recolor``/``move``/``redraw:``, chained with ``;``).

A prompt is ``a photo of ITEM, ITEM and ITEM`` where ``ITEM = NP [RELATION NP]`` and
``NP = a|an|two|three|four [COLOUR] CLASS``. ``a photo of a dog right of a teddy bear`` becomes
GenEval's clauses ``[teddy bear, dog @ right of 0]``; a counted NP also excludes count + 1.
The atomic constraints of a line (its tier) are one presence per required object, one exact count
per counted clause, one per colour word and one per relation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from clvr_agent.eval.rules import COLORS, TAGS
from clvr_agent.tools.shapeworld.world import CLASSES, PLURALS, RELATIONS

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
           "nine": 9, "ten": 10}
WORDS = {v: k for k, v in NUMBERS.items()}
_SINGULAR = {p: c for c, p in PLURALS.items()}
# Counts past ten (a noisy canvas can hold fifteen blobs to remove) are written as digits.
_DET = r"(a|an|the|all|\d+|" + "|".join(NUMBERS) + r")"
_COL = r"(?:(" + "|".join(COLORS) + r")\s+)?"
_CLS = r"(" + "|".join(sorted(list(CLASSES) + list(PLURALS.values()), key=len, reverse=True)) + r")"
_NP = _DET + r"\s+" + _COL + _CLS
_REL = r"(" + "|".join(RELATIONS) + r")"
_ITEM_RE = re.compile(r"^" + _NP + r"(?:\s+" + _REL + r"\s+" + _NP + r")?$")
_NP_RE = re.compile(r"^" + _NP + r"$")
_SPLIT_RE = re.compile(r"\s*,\s*and\s+|\s*,\s*|\s+and\s+")
PREFIX = "a photo of "


@dataclass(frozen=True)
class NP:
    """``count`` objects of ``cls`` (of ``color`` if given); count None means all that match."""

    cls: str
    count: Optional[int] = 1
    color: Optional[str] = None

    def text(self) -> str:
        noun = self.cls if self.count in (1, None) else PLURALS[self.cls]
        if self.count is None:
            det = "the"
        elif self.count == 1:
            det = "an" if (self.color or self.cls)[0] in "aeiou" else "a"
        else:
            det = WORDS.get(self.count, str(self.count))
        return " ".join(w for w in (det, self.color, noun) if w)

    def matches(self, cls: str, color: Optional[str]) -> bool:
        return cls == self.cls and (self.color is None or color == self.color)


def _np_from(det: str, color: Optional[str], noun: str, text: str) -> NP:
    cls = _SINGULAR.get(noun, noun)
    plural = noun != cls
    if det in ("the", "all"):
        return NP(cls, None, color)
    count = 1 if det in ("a", "an") else int(det) if det.isdigit() else NUMBERS[det]
    if plural != (count > 1):
        raise ValueError(f"number disagreement in {text!r}: {det} {noun}")
    return NP(cls, count, color)


def parse_np(text: str) -> NP:
    m = _NP_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"not a ShapeWorld noun phrase: {text!r} (expected e.g. 'two red circles')")
    return _np_from(*m.groups(), text)


# ------------------------------------------------------------------ prompts


Item = tuple[NP, Optional[str], Optional[NP]]  # subject, relation, referent


def parse_items(prompt: str) -> list[Item]:
    body = prompt.strip().lower().rstrip(".")
    if body.startswith(PREFIX):
        body = body[len(PREFIX):]
    items = []
    for part in _SPLIT_RE.split(body):
        m = _ITEM_RE.match(part.strip())
        if not m:
            raise ValueError(
                f"cannot parse {part!r} in prompt {prompt!r}; expected 'a photo of' followed by items like "
                f"'two red circles' or 'a blue star left of a green square' over classes {', '.join(CLASSES)}"
            )
        g = m.groups()
        subject = _np_from(*g[0:3], part)
        if subject.count is None:
            raise ValueError(f"a prompt must say how many: {part!r}")
        referent = _np_from(*g[4:7], part) if g[3] else None
        if referent is not None and referent.count is None:
            raise ValueError(f"a prompt must say how many: {part!r}")
        items.append((subject, g[3], referent))
    return items


def _clause(np_: NP) -> dict:
    c = {"class": np_.cls, "count": np_.count}
    if np_.color:
        c["color"] = np_.color
    return c


def items_to_metadata(items: list[Item], prompt: str) -> dict:
    include: list[dict] = []
    for subject, rel, referent in items:
        if referent is not None:
            include.append(_clause(referent))
            include.append({**_clause(subject), "position": [rel, len(include) - 1]})
        else:
            include.append(_clause(subject))
    exclude = [{"class": c["class"], "count": c["count"] + 1} for c in include if c["count"] > 1]
    line = {"tag": infer_tag(include, exclude), "prompt": prompt, "include": include}
    if exclude:
        line["exclude"] = exclude
    line["tier"] = count_constraints(line)
    return line


def parse_prompt(prompt: str) -> dict:
    """A GenEval metadata line (``tag``, ``prompt``, ``include``, ``exclude``?, ``tier``)."""
    return items_to_metadata(parse_items(prompt), prompt.strip())


def metadata_items(line: dict) -> list[Item]:
    """The prompt structure behind a metadata line (inverse of :func:`items_to_metadata`)."""
    include = line["include"]
    referenced = [c["position"][1] for c in include if "position" in c]
    items: list[Item] = []
    i = 0
    while i < len(include):
        c = include[i]
        nxt = include[i + 1] if i + 1 < len(include) else None
        if nxt is not None and "position" in nxt and nxt["position"][1] == i and referenced.count(i) == 1 \
                and "position" not in c:
            items.append((NP(nxt["class"], nxt["count"], nxt.get("color")), nxt["position"][0],
                          NP(c["class"], c["count"], c.get("color"))))
            i += 2
        elif "position" in c:
            raise ValueError(f"clause {i} of {line['prompt']!r} relates to a clause that is not just before it")
        else:
            items.append((NP(c["class"], c["count"], c.get("color")), None, None))
            i += 1
    return items


def format_prompt(line: dict) -> str:
    """GenEval's phrasing of a metadata line's include clauses."""
    parts = [s.text() + (f" {rel} {r.text()}" if r is not None else "") for s, rel, r in metadata_items(line)]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return PREFIX + body


def infer_tag(include: list[dict], exclude: list[dict]) -> str:
    """The GenEval task a clause structure belongs to, or ``composite`` for anything richer."""
    n = len(include)
    counts = [c["count"] for c in include]
    colored = ["color" in c for c in include]
    placed = ["position" in c for c in include]
    if n == 1 and not placed[0]:
        if counts[0] == 1:
            return "colors" if colored[0] else "single_object"
        if not colored[0]:
            return "counting"
    if n == 2 and counts == [1, 1]:
        if not any(colored) and not any(placed):
            return "two_object"
        if not any(colored) and placed == [False, True] and include[1]["position"][1] == 0:
            return "position"
        if all(colored) and not any(placed):
            return "color_attr"
    return "composite"


def count_constraints(line: dict) -> int:
    """Atomic constraints C: a presence per required object, an exact count per counted clause,
    a colour per colour word, a relation per relation."""
    return sum(c["count"] + (c["count"] > 1) + ("color" in c) + ("position" in c) for c in line["include"])


# ------------------------------------------------------------------ generators


def geneval_line(tag: str, rng: np.random.Generator) -> dict:
    """One seeded prompt of a GenEval task over the ShapeWorld classes."""
    if tag not in TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(TAGS)}")
    a, b = (str(x) for x in rng.choice(CLASSES, 2, replace=False))
    c1, c2 = (str(x) for x in rng.choice(COLORS, 2, replace=False))
    items: list[Item] = {
        "single_object": [(NP(a), None, None)],
        "two_object": [(NP(a), None, None), (NP(b), None, None)],
        "counting": [(NP(a, int(rng.integers(2, 5))), None, None)],
        "colors": [(NP(a, 1, c1), None, None)],
        "position": [(NP(a), str(rng.choice(RELATIONS)), NP(b))],
        "color_attr": [(NP(a, 1, c1), None, None), (NP(b, 1, c2), None, None)],
    }[tag]
    line = items_to_metadata(items, "")
    line["prompt"] = format_prompt(line)
    assert line["tag"] == tag, (line, tag)
    return line


def geneval_lines(n: int, seed: int) -> list[dict]:
    """``n`` prompts cycling through the six tasks in GenEval's order (balanced tasks)."""
    rng = np.random.default_rng(seed)
    return [geneval_line(TAGS[i % len(TAGS)], rng) for i in range(n)]


MAX_TIER = 10
MAX_OBJECTS_PER_PROMPT = 10


def tier_line(tier: int, rng: np.random.Generator) -> dict:
    """A prompt with exactly ``tier`` atomic constraints, mixing presence, count, colour and relation."""
    if not 1 <= tier <= MAX_TIER:
        raise ValueError(f"tier must be in 1..{MAX_TIER}, got {tier}")
    while True:
        line = _try_tier(tier, rng)
        if line is not None:
            return line


def _try_tier(tier: int, rng: np.random.Generator) -> Optional[dict]:
    classes = [str(c) for c in rng.permutation(CLASSES)]
    clauses = [{"cls": classes.pop(), "count": 1, "color": None, "pair": None}]
    atoms = 1
    for _ in range(50):
        left = tier - atoms
        if left == 0:
            break
        n_objects = sum(c["count"] for c in clauses)
        actions = []
        if classes and n_objects < MAX_OBJECTS_PER_PROMPT:
            actions.append("object")
        if any(c["color"] is None for c in clauses):
            actions.append("color")
        if n_objects < MAX_OBJECTS_PER_PROMPT and any(
                (c["count"] == 1 and left >= 2) or 2 <= c["count"] < 4 for c in clauses):
            actions.append("count")
        if sum(c["pair"] is None for c in clauses) >= 2:
            actions.append("relation")
        if not actions:
            return None
        act = str(rng.choice(actions))
        if act == "object":
            clauses.append({"cls": classes.pop(), "count": 1, "color": None, "pair": None})
            atoms += 1
        elif act == "color":
            c = rng.choice([c for c in clauses if c["color"] is None])
            c["color"] = str(rng.choice(COLORS))
            atoms += 1
        elif act == "count":
            c = rng.choice([c for c in clauses if (c["count"] == 1 and left >= 2) or 2 <= c["count"] < 4])
            atoms += 2 if c["count"] == 1 else 1
            c["count"] += 1
        else:
            free = [i for i, c in enumerate(clauses) if c["pair"] is None]
            i, j = (int(x) for x in rng.choice(free, 2, replace=False))
            clauses[i]["pair"] = ("subject", j, str(rng.choice(RELATIONS)))
            clauses[j]["pair"] = ("referent", i, None)
            atoms += 1
    if atoms != tier:
        return None
    items: list[Item] = []
    for c in clauses:
        np_ = NP(c["cls"], c["count"], c["color"])
        if c["pair"] is None:
            items.append((np_, None, None))
        elif c["pair"][0] == "subject":
            r = clauses[c["pair"][1]]
            items.append((np_, c["pair"][2], NP(r["cls"], r["count"], r["color"])))
    line = items_to_metadata(items, "")
    line["prompt"] = format_prompt(line)
    assert line["tier"] == tier
    return line


def tier_lines(tiers, per_tier: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [tier_line(t, rng) for t in tiers for _ in range(per_tier)]


# ------------------------------------------------------------------ edit instructions


@dataclass(frozen=True)
class Op:
    """One edit: ``add``/``remove``/``recolor``/``move`` an NP, or ``redraw`` a prompt."""

    kind: str
    target: Optional[NP] = None
    relation: Optional[str] = None
    reference: Optional[NP] = None
    color: Optional[str] = None
    prompt: Optional[str] = None

    def text(self) -> str:
        if self.kind == "redraw":
            return f"redraw: {self.prompt}"
        where = f" {self.relation} {self.reference.text()}" if self.relation else ""
        if self.kind == "recolor":
            return f"recolor {self.target.text()} to {self.color}"
        return f"{self.kind} {self.target.text()}{where}"


_OP_RE = re.compile(r"^(add|remove|move|recolor)\s+(.+?)(?:\s+" + _REL + r"\s+(.+?))?(?:\s+to\s+(\w+))?$")


def parse_op(text: str) -> Op:
    t = text.strip()
    if t.lower().startswith("redraw:"):
        prompt = t[len("redraw:"):].strip()
        parse_items(prompt)  # must be a ShapeWorld prompt
        return Op("redraw", prompt=prompt)
    m = _OP_RE.match(t.lower())
    if not m:
        raise ValueError(f"cannot parse edit {text!r}; expected add/remove/recolor/move/redraw: ...")
    kind, target, rel, ref, color = m.groups()
    op = Op(kind, parse_np(target), rel, parse_np(ref) if ref else None, color)
    if kind == "recolor" and (color not in COLORS or rel):
        raise ValueError(f"recolor needs 'to <colour>' with one of {', '.join(COLORS)}: {text!r}")
    if kind != "recolor" and color:
        raise ValueError(f"only recolor takes 'to <colour>': {text!r}")
    if kind == "move" and not rel:
        raise ValueError(f"move needs a relation ({', '.join(RELATIONS)}) and a reference: {text!r}")
    if kind == "remove" and rel:
        raise ValueError(f"remove takes no relation: {text!r}")
    return op


def parse_instruction(text: str) -> list[Op]:
    """Ops chained with ``;`` (a bare prompt is a redraw of it)."""
    parts = [p for p in (s.strip() for s in text.split(";")) if p]
    if not parts:
        raise ValueError("empty instruction")
    ops = []
    for p in parts:
        if re.match(r"^(add|remove|move|recolor)\s", p.lower()) or p.lower().startswith("redraw:"):
            ops.append(parse_op(p))
        else:
            parse_items(p)
            ops.append(Op("redraw", prompt=p))
    return ops


def format_instruction(ops: list[Op]) -> str:
    return "; ".join(op.text() for op in ops)
