"""Graph state, run settings and the runtime context the models travel in.

The state is checkpointed after every node, so it holds only serializable records (pydantic
models from :mod:`clvr_agent.types` and plain values). Models, the artifact store and the
cancellation flag live in :class:`ClvrContext`, which LangGraph passes to nodes but never saves.
"""

from __future__ import annotations

import atexit
import operator
import os
import shutil
import threading
from typing import Annotated, Any, Optional

from typing_extensions import TypedDict  # pydantic (and the LangGraph server schema export) needs it on 3.11

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from clvr_agent.errors import NoBackendsError
from clvr_agent.store import ArtifactStore
from clvr_agent.types import Correction, ImageRef, ModelCall, Plan, Status, Step


class Settings(BaseModel):
    """Every knob of a run, validated once when the runnable is built."""

    model_config = ConfigDict(extra="forbid")

    max_iterations: int = Field(8, ge=1, le=64, description="Generate/verify rounds before giving up (paper: 8).")
    reference_window: int = Field(3, ge=0, le=8, description="How many recent canvases the executor sees (K).")
    passive_retries: int = Field(2, ge=0, le=8, description="Re-draws of a step whose instruction did not execute.")
    executor_retries: int = Field(1, ge=0, le=8, description="Retries of an executor call that raised.")
    controller_retries: int = Field(
        2, ge=0, le=8, description="Retries of a controller call that raised (network or model errors).")
    patience: int = Field(3, ge=1, le=64, description="Stop as no_progress after this many rounds without a better score.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt accepted.")
    seed: int = Field(0, ge=0, lt=2**63, description="Default seed when the input gives none.")
    steps: Optional[int] = Field(None, ge=1, le=1000, description="Denoising steps; None = the executor's default.")
    guidance: Optional[float] = Field(None, ge=0.0, description="Guidance scale; None = the executor's default.")
    height: Optional[int] = Field(None, ge=16, le=4096)
    width: Optional[int] = Field(None, ge=16, le=4096)
    interactive: bool = Field(False, description="Pause for approval after plan and before stop.")
    artifact_dir: Optional[str] = Field(None, description=(
        "Where canvases are written. None: a temp folder per context (per run on a LangGraph server), "
        "removed when the process exits; set it to keep the images."))

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


MAX_SEED = 2**63  # seeds are checkpointed as msgpack integers: 0 <= seed < 2**63
MAX_REFERENCE_PIXELS = 4096 * 4096


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


def _seed_range(value: int) -> int:
    if not 0 <= value < MAX_SEED:
        raise ValueError("must be an integer with 0 <= seed < 2**63")
    return value


def _check_reference(path: Any) -> str:
    """A starting image: an existing, readable file within the pixel budget (header only, no decode)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"must be an image path, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"reference image not found: {p}")
    try:
        with Image.open(p) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"reference image is not a readable image: {p} ({type(exc).__name__})") from None
    if w * h > MAX_REFERENCE_PIXELS:
        raise ValueError(f"{p} is {w}x{h}; at most {MAX_REFERENCE_PIXELS} pixels (4096x4096) are accepted")
    return p


def _reference_list(value: Any) -> Any:
    if isinstance(value, (str, bytes, os.PathLike)):
        raise ValueError("must be a list of image paths, not a single string")
    return value


class ClvrInput(BaseModel):
    """One run's input, validated before any model runs (the graph's ``input_schema``).

    ``seed`` and ``max_iterations`` may be omitted or null: the context's defaults apply.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, description="What the image must show.")
    seed: Optional[Annotated[int, BeforeValidator(_not_bool), AfterValidator(_seed_range)]] = Field(
        None, description="Run seed (0 <= seed < 2**63); null = the context's seed.")
    max_iterations: Optional[Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=64)]] = Field(
        None, description="Loop budget for this run (1-64); null = the context's max_iterations.")
    references: Annotated[list[Annotated[str, BeforeValidator(_check_reference)]],
                          BeforeValidator(_reference_list)] = Field(
        default_factory=list, max_length=8,
        description="Paths of starting images (each at most 4096x4096) that the first step edits.")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value


def input_error(exc: ValidationError) -> str:
    """One line naming the first bad field and what is allowed (for the CLI, the API and the tool)."""
    first = exc.errors()[0]
    field_name = ".".join(str(p) for p in first["loc"]) or "input"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r:.60})"
    return f"{field_name}: {msg}{shown}"


class ClvrOutput(TypedDict, total=False):
    """What a run returns (``invoke``, the LangGraph server, the agent tool)."""

    status: Status
    stop_reason: str
    final_image: Annotated[Optional[str], Field(description=(
        "Path of the final image (the trajectory's final_canvas); null when the run drew nothing."))]
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
    model_calls: Annotated[list[ModelCall], operator.add]  # per run, one record per model call
    pending: Optional[Correction]
    iterations: int  # the iteration in progress (1-based); at the end, how many the run took
    attempt: int
    status: Status
    stop_reason: str
    final_image: Optional[str]  # set by stop_run: the path of the final image (the trajectory's final_canvas)
    trajectory: dict


class ClvrContext(Settings):
    """What LangGraph passes to every node: plain, serializable run configuration.

    Every field has a default, so ``context={}`` (or a LangGraph assistant's stored context) means
    the embedded ShapeWorld backend with the default settings. Models are looked up by name in the
    graph's :class:`~clvr_agent.protocols.Backends` (the app's: the per-process registry, keyed by
    ``backend``/``controller`` and their options, so a second run loads nothing). Python callers may hand in live objects instead (``executor=``, ``controller=``
    with an object, ``store=``); those ride along as private attributes, never in the schema.
    ``settings=Settings(...)`` is accepted and flattened, for callers of the 0.1 API.

    The per-run cancel flag is private too: :meth:`for_run` gives each run its own copy.
    """

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("shapeworld", description="Executor backend name (shapeworld, clvr-mini, flux2-klein).")
    controller: Optional[str] = Field(
        None, description="Controller backend name (shapeworld, qwen3-vl, chat-model); None = the backend's default.")
    executor_options: dict[str, Any] = Field(
        default_factory=dict, description="Executor options: model (hub id or folder), torch_dtype, device, offload.")
    controller_options: dict[str, Any] = Field(
        default_factory=dict, description="Controller options: vlm, torch_dtype, device, base_url, model_name.")

    _executor: Any = PrivateAttr(None)
    _controller: Any = PrivateAttr(None)
    _store: Optional[ArtifactStore] = PrivateAttr(None)
    _backends: Any = PrivateAttr(None)
    _cancel: threading.Event = PrivateAttr(default_factory=threading.Event)

    def __init__(self, **data: Any) -> None:
        executor = data.pop("executor", None)
        controller = data.get("controller")
        if controller is not None and not isinstance(controller, str):
            data.pop("controller")
        else:
            controller = None
        store = data.pop("store", None)
        settings = data.pop("settings", None)
        if settings is not None:
            given = settings.model_dump(exclude_unset=True) if isinstance(settings, Settings) else dict(settings)
            data = {**given, **data}
        super().__init__(**data)
        self._executor, self._controller, self._store = executor, controller, store

    @property
    def settings(self) -> Settings:
        """The run settings alone (the fields this context shares with :class:`Settings`)."""
        return Settings(**{k: getattr(self, k) for k in Settings.model_fields})

    def use_backends(self, backends) -> "ClvrContext":
        """Resolve this context's backend names through ``backends`` (a :class:`~clvr_agent.protocols.Backends`);
        the graph does this with the source it was built with. Returns the context."""
        if self._backends is None:
            self._backends = backends
        return self

    def _resolve(self, kind: str):
        if self._backends is None:
            name = self.backend if kind == "executor" else (self.controller or f"the default for {self.backend!r}")
            raise NoBackendsError(
                f"no {kind}: the context names {name!r} but the graph has no backends to resolve it; build it "
                f"with build_graph(backends=clvr_agent.tools.registry) (create_clvr does) or hand in {kind}=")
        return self._backends

    def get_executor(self):
        """The live executor: the one handed in, else the backends' for ``backend`` (built once per process)."""
        if self._executor is None:
            self._executor = self._resolve("executor").get_executor(self.backend, **self.executor_options)
        return self._executor

    def get_controller(self):
        """The live controller: the one handed in, else the backends' for ``controller`` (or the
        backend's default pairing)."""
        if self._controller is None:
            backends = self._resolve("controller")
            name = self.controller or backends.default_controller(self.backend)
            self._controller = backends.get_controller(name, **self.controller_options)
        return self._controller

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            import tempfile

            root = self.artifact_dir
            if root is None:  # a temp folder for this context's runs, removed when the process exits
                root = tempfile.mkdtemp(prefix="clvr-")
                atexit.register(shutil.rmtree, root, ignore_errors=True)
            self._store = ArtifactStore(root)
        return self._store

    def use_store(self, store: ArtifactStore) -> None:
        """Write this context's canvases to ``store`` (a run folder's, say) instead of ``artifact_dir``."""
        self._store = store

    def for_run(self) -> "ClvrContext":
        """A copy for one run: same configuration, models and store, its own cancel flag."""
        run = self.model_copy()
        self.store  # resolve once, so every run of a runnable writes to the same folder
        run._executor, run._controller, run._store = self._executor, self._controller, self._store
        run._backends = self._backends
        run._cancel = threading.Event()
        return run

    def cancel(self) -> None:
        """Ask this run's executor to stop after its current denoising step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()
