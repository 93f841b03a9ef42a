"""Core records of a CLVR run: plans, requests, verdicts, steps and the trajectory.

Everything here is plain, serializable pydantic data. Images never appear as pixels: an
:class:`ImageRef` points at a content-addressed PNG in the run's artifact store. The same
:class:`Trajectory` record is what ``trajectory.json`` holds and what training reads back.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 1.1 adds model_calls, 1.2 names a fresh drawing "generate", 1.3 renames final_image to final_canvas
# (the run output's final_image stays: the path of that canvas). Older records load.
TRAJECTORY_SCHEMA_VERSION = "1.3"
_OLDER_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2")

Status = Literal["running", "satisfied", "budget_exhausted", "no_progress", "failed"]
StepMode = Literal["generate", "edit", "inpaint"]
CorrectionMode = Literal["edit", "generate", "inpaint"]
ConstraintKind = Literal["presence", "count", "color", "relation", "absence", "other"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# Where relative ImageRef paths resolve: a run folder's store writes paths relative to the folder
# (so it can move), and the graph sets this for the duration of each node.
IMAGE_ROOT: ContextVar[Optional[str]] = ContextVar("clvr_image_root", default=None)


class ImageRef(_Record):
    """A PNG in the artifact store, named by the sha256 of its bytes. ``path`` is absolute, or
    relative to the run folder (then resolved against :data:`IMAGE_ROOT`)."""

    path: str
    sha256: str
    width: int
    height: int
    size_bytes: int

    def open(self):
        """Load the pixels (PIL, RGB). Only tools call this; state never holds the result."""
        from PIL import Image

        with Image.open(self.resolved()) as im:
            return im.convert("RGB")

    def resolved(self, root: Optional[str] = None) -> str:
        """The file's path: relative paths are joined to ``root`` (default: :data:`IMAGE_ROOT`)."""
        if os.path.isabs(self.path):
            return self.path
        base = root if root is not None else IMAGE_ROOT.get()
        return os.path.join(base, self.path) if base else self.path

    @property
    def name(self) -> str:
        return Path(self.path).name


class Region(_Record):
    """An axis-aligned box in pixels (x0, y0, x1, y1) for masked edits."""

    x0: int
    y0: int
    x1: int
    y1: int


class Constraint(_Record):
    """One atomic checklist item the final image must satisfy."""

    id: str
    text: str
    kind: ConstraintKind = "other"


class Plan(_Record):
    """The controller's decomposition of the prompt and its first instruction."""

    constraints: list[Constraint]
    first_instruction: str
    reasoning: str = ""
    fallback: bool = Field(False, description="True when the controller failed and the prompt became a one-item plan.")


class ConstraintResult(_Record):
    id: str
    satisfied: bool
    detail: str = ""


class Verdict(_Record):
    """Active verification: does the canvas satisfy the whole prompt?"""

    satisfied: bool
    score: float = Field(ge=0.0, le=1.0)
    constraints: list[ConstraintResult] = Field(default_factory=list)
    summary: str = ""

    def unmet(self) -> list[ConstraintResult]:
        return [c for c in self.constraints if not c.satisfied]


class PassiveCheck(_Record):
    """Passive verification: did this step do what its instruction asked?"""

    executed: bool
    detail: str = ""


class Correction(_Record):
    """The controller's next instruction, and whether to edit the canvas or draw afresh."""

    instruction: str
    mode: CorrectionMode = "edit"
    reasoning: str = ""
    region: Optional[Region] = None
    region_prompt: Optional[str] = Field(None, description=(
        "With mode 'inpaint': what the region alone should show (e.g. 'a photo of a blue square'); the "
        "executor then draws the region afresh from it and pastes it into the canvas."))

    @field_validator("mode", mode="before")
    @classmethod
    def _old_mode_name(cls, value):
        """Schema 1.0/1.1 records (and controllers trained on them) call a fresh drawing 'regenerate'."""
        return "generate" if value == "regenerate" else value


class ExecutorRequest(_Record):
    """What the executor is asked to draw, with trajectory-accumulative conditioning."""

    mode: StepMode
    instruction: str
    accumulated_prompt: str = Field(description="The original prompt plus every instruction so far, in order.")
    references: list[ImageRef] = Field(default_factory=list, description="Most recent canvases, oldest first.")
    seed: int
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    region: Optional[Region] = None
    region_prompt: Optional[str] = None


class Step(_Record):
    """One executor call and what the controller concluded about it."""

    index: int
    iteration: int
    attempt: int = 0
    instruction: str
    reasoning: str = ""
    request: ExecutorRequest
    canvas: Optional[ImageRef] = None
    passive: Optional[PassiveCheck] = None
    verdict: Optional[Verdict] = None
    accepted: bool = True
    nfe: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    error: Optional[str] = None


class ModelCall(_Record):
    """One call into a model (executor or controller) and how long it took: the run's timings."""

    node: str
    model: Literal["executor", "controller"]
    method: str
    seconds: float
    step: Optional[int] = None
    ok: bool = True


class Trajectory(_Record):
    """The whole interleaved record of one run (``trajectory.json``)."""

    schema_version: str = TRAJECTORY_SCHEMA_VERSION
    prompt: str
    seed: int
    backend: str = ""
    controller: str = ""
    plan: Optional[Plan] = None
    steps: list[Step] = Field(default_factory=list)
    status: Status = "running"
    stop_reason: str = ""
    final_canvas: Optional[ImageRef] = Field(
        None, description="The canvas the run returns (the run output's final_image is its path).")
    iterations: int = 0
    model_calls: list[ModelCall] = Field(default_factory=list, description="Every model call of the run, in order.")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data):
        """Schema 1.0-1.2 records call the final canvas ``final_image``; a loaded record is a current one,
        so writing it back gives a record its version describes."""
        if not isinstance(data, dict):
            return data
        if "final_image" in data:
            if "final_canvas" in data:
                raise ValueError("final_image is the pre-1.3 name of final_canvas: give one of them")
            data = {("final_canvas" if k == "final_image" else k): v for k, v in data.items()}
        if data.get("schema_version") in _OLDER_SCHEMA_VERSIONS:
            data = {**data, "schema_version": TRAJECTORY_SCHEMA_VERSION}
        return data


def trajectory_json_schema() -> dict:
    """The versioned JSON schema of :class:`Trajectory` (exported for training data consumers)."""
    schema = Trajectory.model_json_schema()
    schema["$id"] = f"https://clvr-agent/trajectory/{TRAJECTORY_SCHEMA_VERSION}"
    schema["version"] = TRAJECTORY_SCHEMA_VERSION
    return schema
