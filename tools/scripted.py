"""A controller that replays a fixed script of verdicts: for benchmarks and graph tests.

It judges nothing; it lets a benchmark run exactly the loop shape it asks for (e.g. plan,
generate, verify, correct, edit, verify, stop) around a real executor, so that the time measured
is the executor's and the framework's, not a VLM's.
"""

from __future__ import annotations

import itertools
import threading
from typing import Optional, Sequence

from PIL import Image

from clvr_agent.types import Constraint, Correction, PassiveCheck, Plan, Step, Verdict, ConstraintResult


class ScriptedController:
    """Verdict ``i`` has score ``scores[i]``; the run is satisfied at the first score of 1.0."""

    name = "scripted"

    def __init__(
        self,
        scores: Sequence[float] = (0.5, 1.0),
        *,
        passive: Sequence[bool] = (),
        corrections: Sequence[str] = ("add a blue square to the right",),
        correction_mode: str = "edit",
    ):
        self.scores = list(scores)
        self.passive = list(passive)
        self.corrections = list(corrections)
        self.correction_mode = correction_mode
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._verify = itertools.count()
        self._passive = itertools.count()
        self._correct = itertools.count()
        self.calls: list[str] = []

    def plan(self, prompt: str) -> Plan:
        self.calls.append("plan")
        return Plan(
            constraints=[Constraint(id="c0", text=prompt, kind="other")],
            first_instruction=prompt,
        )

    def check_step(self, instruction: str, before: Optional[Image.Image], after: Image.Image) -> PassiveCheck:
        self.calls.append("check_step")
        with self._lock:
            i = next(self._passive)
        ok = self.passive[i] if i < len(self.passive) else True
        return PassiveCheck(executed=ok, detail="scripted")

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        self.calls.append("verify")
        with self._lock:
            i = next(self._verify)
        score = self.scores[min(i, len(self.scores) - 1)]
        ok = score >= 1.0
        return Verdict(
            satisfied=ok,
            score=score,
            constraints=[ConstraintResult(id="c0", satisfied=ok, detail="" if ok else f"scripted miss {i}")],
        )

    def correct(self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]) -> Correction:
        self.calls.append("correct")
        with self._lock:
            i = next(self._correct)
        return Correction(instruction=self.corrections[i % len(self.corrections)], mode=self.correction_mode)
