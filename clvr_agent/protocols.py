"""The small protocols the graph talks to: an executor, a controller, and where they come from.

An :class:`Executor` draws or edits a canvas; a :class:`Controller` plans, verifies and corrects.
Backends receive PIL images (loaded by the graph from the artifact store) and return pydantic
records from :mod:`clvr_agent.types`; they never see graph state. :class:`Backends` resolves the
names a plain-data context carries (``backend="clvr-mini"``) to live objects; the app wires the
shipped registry (:mod:`clvr_agent.tools.registry`) into the graph as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

from PIL import Image

from clvr_agent.types import (
    Correction,
    ExecutorRequest,
    PassiveCheck,
    Plan,
    Step,
    Verdict,
)

# progress(step, total) -> True to cancel the remaining denoising steps.
ProgressFn = Callable[[int, int], Optional[bool]]


@dataclass
class GenerationOutput:
    image: Image.Image
    nfe: int
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


@runtime_checkable
class Executor(Protocol):
    name: str

    def generate(
        self,
        request: ExecutorRequest,
        references: list[Image.Image],
        progress: Optional[ProgressFn] = None,
    ) -> GenerationOutput:
        """Draw (``request.mode == "generate"``) or edit (``"edit"``/``"inpaint"``) a canvas.

        ``references`` are the pixels of ``request.references`` in the same order (oldest first);
        the most recent canvas is last.
        """
        ...


@runtime_checkable
class Controller(Protocol):
    name: str

    def plan(self, prompt: str) -> Plan:
        """Decompose the prompt into a checklist of constraints and the first instruction."""
        ...

    def check_step(
        self, instruction: str, before: Optional[Image.Image], after: Image.Image
    ) -> PassiveCheck:
        """Passive track: did the canvas change the way ``instruction`` asked?"""
        ...

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        """Active track: does ``canvas`` satisfy the whole prompt, constraint by constraint?"""
        ...

    def correct(
        self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]
    ) -> Correction:
        """Write the next instruction that fixes what ``verdict`` found unmet."""
        ...


@runtime_checkable
class Backends(Protocol):
    """Named backends, each built once per process (a module with these three functions qualifies)."""

    def get_executor(self, name: str, **options) -> Executor: ...

    def get_controller(self, name: str, **options) -> Controller: ...

    def default_controller(self, backend: str) -> str:
        """The controller a backend pairs with when the context names none."""
        ...
