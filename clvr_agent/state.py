"""Graph state, run settings and the runtime context the models travel in.

The state is checkpointed after every node, so it holds only serializable records (pydantic
models from :mod:`clvr_agent.types` and plain values). Models, the artifact store and the
cancellation flag live in :class:`ClvrContext`, which LangGraph passes to nodes but never saves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clvr_agent.store import ArtifactStore
from clvr_agent.types import Correction, ImageRef, Plan, Status, Step


class Settings(BaseModel):
    """Every knob of a run, validated once when the runnable is built."""

    model_config = ConfigDict(extra="forbid")

    max_iterations: int = Field(8, ge=1, le=64, description="Generate/verify rounds before giving up (paper: 8).")
    reference_window: int = Field(3, ge=0, le=8, description="How many recent canvases the executor sees (K).")
    passive_retries: int = Field(2, ge=0, le=8, description="Re-draws of a step whose instruction did not execute.")
    executor_retries: int = Field(1, ge=0, le=8, description="Retries of an executor call that raised.")
    patience: int = Field(3, ge=1, le=64, description="Stop as no_progress after this many rounds without a better score.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt accepted.")
    seed: int = Field(0, description="Default seed when the input gives none.")
    steps: Optional[int] = Field(None, ge=1, le=1000, description="Denoising steps; None = the executor's default.")
    guidance: Optional[float] = Field(None, ge=0.0, description="Guidance scale; None = the executor's default.")
    height: Optional[int] = Field(None, ge=16, le=4096)
    width: Optional[int] = Field(None, ge=16, le=4096)
    interactive: bool = Field(False, description="Pause for approval after plan and before stop.")
    artifact_dir: Optional[str] = Field(None, description="Where canvases are written; a temp dir when None.")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if (self.height is None) != (self.width is None):
            raise ValueError("give both height and width, or neither")
        return self


def checkpoint_serde():
    """A LangGraph serializer that knows the run's record types (no "unregistered type" warnings,
    and works under ``LANGGRAPH_STRICT_MSGPACK=true``). Pass it to your checkpointer: ``SqliteSaver(conn, serde=checkpoint_serde())``."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from clvr_agent import types

    records = [name for name, obj in vars(types).items()
               if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == types.__name__]
    return JsonPlusSerializer(allowed_msgpack_modules=[(types.__name__, name) for name in records])


def validate_prompt(prompt: Any, limit: int) -> str:
    """The one place a prompt is judged acceptable; raises ValueError with a one-line reason."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    if len(prompt) > limit:
        raise ValueError(f"prompt is {len(prompt)} characters; the limit is {limit} (setting max_prompt_chars)")
    return prompt.strip()


def upsert_steps(old: list[Step], new: list[Step]) -> list[Step]:
    """Reducer: a returned step replaces the stored one with the same index, else it is appended."""
    merged = {s.index: s for s in old or []}
    for s in new or []:
        merged[s.index] = s
    return [merged[i] for i in sorted(merged)]


class ClvrInput(TypedDict, total=False):
    prompt: str
    seed: int
    max_iterations: int
    references: list[str]  # paths of starting images the first step edits instead of drawing afresh


class ClvrOutput(TypedDict, total=False):
    status: Status
    stop_reason: str
    final_image: Optional[str]
    iterations: int
    trajectory: dict


class ClvrState(TypedDict, total=False):
    prompt: str
    seed: int
    max_iterations: int
    references: list[str]
    init_references: list[ImageRef]
    plan: Optional[Plan]
    steps: Annotated[list[Step], upsert_steps]
    pending: Optional[Correction]
    iteration: int
    attempt: int
    status: Status
    stop_reason: str
    final_image: Optional[str]
    iterations: int
    trajectory: dict


@dataclass
class ClvrContext:
    """What a run needs besides its state: the models, the store, settings and a cancel flag."""

    executor: Any
    controller: Any
    settings: Settings = field(default_factory=Settings)
    store: Optional[ArtifactStore] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    # Seconds spent inside model calls, per run; the overhead bench reads it.
    model_seconds: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.store is None:
            import tempfile

            root = self.settings.artifact_dir or tempfile.mkdtemp(prefix="clvr-")
            self.store = ArtifactStore(root)
