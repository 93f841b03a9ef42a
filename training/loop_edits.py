"""The edits the loop asks for, reproduced outside the graph: the edit data and the edit-success eval.

:func:`first_edit` runs the loop's own steps on a prompt until the controller asks for a whole-canvas
edit: the first draw (and a redraw, when the controller asks for one first), each verified, then the
controller's correction, and the executor request the graph builds for it (``graphs.graph.build_request``:
the accumulated prompt and the last K canvases). Who draws is a parameter, so the training data draws
with the ShapeWorld world (exact, scene known) and the eval with the model under test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

from PIL import Image

from clvr_agent.graphs.graph import build_request
from clvr_agent.state import ClvrContext
from clvr_agent.types import Correction, ExecutorRequest, ImageRef, Step

# draw(request) -> the canvas an executor draws for a ``generate`` request (no references)
Draw = Callable[[ExecutorRequest], Image.Image]
MAX_DRAWS = 3  # first draw + redraws before giving up on a prompt (the ShapeWorld controller redraws once)


@dataclass
class LoopEdit:
    """The loop at the moment it asks for an edit."""

    prompt: str
    steps: list[Step]  # the accepted steps so far, oldest first (canvases named ``canvas-<index>``)
    canvases: list[Image.Image]  # their canvases, in the same order
    correction: Correction  # the controller's edit (mode ``edit``)
    request: ExecutorRequest  # what the graph hands the executor for it

    def references(self) -> list[Image.Image]:
        """The reference canvases of ``request``, oldest first (the last is the canvas being edited)."""
        by_path = {s.canvas.path: im for s, im in zip(self.steps, self.canvases)}
        return [by_path[r.path] for r in self.request.references]


def canvas_ref(index: int, image: Image.Image) -> ImageRef:
    """A stand-in store reference for step ``index``'s canvas (only its path and size are read)."""
    return ImageRef(path=f"canvas-{index}.png", sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                    width=image.width, height=image.height, size_bytes=0)


def loop_request(prompt: str, seed: int, steps: list[Step], pending: Correction,
                 context: Optional[ClvrContext] = None) -> ExecutorRequest:
    """The request the graph builds for ``pending`` after ``steps`` (default settings: K = 3 references)."""
    state = {"prompt": prompt, "seed": seed, "steps": steps, "pending": pending, "init_references": []}
    return build_request(state, context or ClvrContext())


def first_edit(prompt: str, seed: int, draw: Draw, controller, context: Optional[ClvrContext] = None) -> Optional[LoopEdit]:
    """Draw, verify and correct as the loop does until the controller asks for an edit.

    ``None`` when a canvas satisfies the prompt first (no edit is asked), a draw is empty (the graph
    would re-draw it), or the controller asks for something else (a region draw, a third draw).
    """
    plan = controller.plan(prompt)
    steps: list[Step] = []
    canvases: list[Image.Image] = []
    pending = Correction(instruction=plan.first_instruction, mode="generate", reasoning=plan.reasoning)
    for _ in range(MAX_DRAWS):
        request = loop_request(prompt, seed, steps, pending, context)
        canvas = draw(request)
        passive = controller.check_step(pending.instruction, None, canvas)
        if not passive.executed:
            return None
        verdict = controller.verify(prompt, plan, canvas, steps)
        steps.append(Step(index=len(steps), iteration=len(steps) + 1, instruction=pending.instruction,
                          reasoning=pending.reasoning, request=request, canvas=canvas_ref(len(steps), canvas),
                          passive=passive, verdict=verdict))
        canvases.append(canvas)
        if verdict.satisfied:
            return None
        pending = controller.correct(prompt, plan, verdict, canvas, steps)
        if pending.mode == "edit":
            return LoopEdit(prompt, steps, canvases, pending, loop_request(prompt, seed, steps, pending, context))
        if pending.mode != "generate":
            return None
    return None
