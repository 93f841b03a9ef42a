"""The public entry points: ``create_clvr`` (a LangChain Runnable) and ``clvr_tool`` (a BaseTool)."""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from clvr_agent.state import ClvrContext, Settings
from clvr_agent.tools.base import Controller, Executor
from clvr_agent.tools.registry import get_controller, get_executor

# Which controller a backend pairs with when none is named. A VLM controller works with any
# executor; the ShapeWorld controller judges anything that draws ShapeWorld scenes.
DEFAULT_CONTROLLER = {"shapeworld": "shapeworld", "clvr-mini": "shapeworld", "flux2-klein": "qwen3-vl"}


def _resolve_controller(controller: Any, backend: str, options: dict) -> Controller:
    if controller is None:
        controller = DEFAULT_CONTROLLER.get(backend, "shapeworld")
    if isinstance(controller, str):
        return get_controller(controller, **options)
    try:
        from langchain_core.language_models import BaseChatModel
    except ImportError:  # pragma: no cover - langchain-core is a hard dependency
        BaseChatModel = ()
    if isinstance(controller, BaseChatModel):
        from clvr_agent.tools.chat_controller import ChatModelController

        return ChatModelController(controller, **options)
    if isinstance(controller, Controller):
        return controller
    raise ValueError(f"controller must be a backend name, a Controller or a LangChain chat model, got {type(controller).__name__}")


def build_context(
    backend: Union[str, Executor] = "shapeworld",
    *,
    controller: Any = None,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    **settings: Any,
) -> ClvrContext:
    """Resolve backends (each loaded once per process) and validate settings."""
    cfg = Settings(**settings)
    if isinstance(backend, str):
        executor = get_executor(backend, **(executor_options or {}))
        name = backend
    else:
        executor, name = backend, getattr(backend, "name", "custom")
    ctl = _resolve_controller(controller, name, controller_options or {})
    return ClvrContext(executor=executor, controller=ctl, settings=cfg)


def create_clvr(
    backend: Union[str, Executor] = "shapeworld",
    *,
    checkpointer: Any = None,
    controller: Any = None,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    context: Optional[ClvrContext] = None,
    **settings: Any,
) -> Runnable:
    """The compiled CLVR graph with its models bound, as a LangChain Runnable.

    ``invoke({"prompt": ...})`` returns ``status``, ``final_image``, ``iterations`` and ``trajectory``.
    ``stream`` supports the ``updates``, ``values`` and ``custom`` modes; ``batch``, ``ainvoke`` and
    ``astream`` work as on any Runnable. Settings are the fields of :class:`~clvr_agent.state.Settings`.
    """
    from clvr_agent.graphs.graph import build_graph

    ctx = context or build_context(
        backend, controller=controller, executor_options=executor_options,
        controller_options=controller_options, **settings,
    )
    graph = build_graph(interactive=ctx.settings.interactive).compile(checkpointer=checkpointer, name="clvr")
    return ClvrRunnable(bound=graph, kwargs={"context": ctx}, clvr_context=ctx)


class ClvrRunnable(RunnableBinding):
    """The compiled graph with its context bound to every call (invoke, stream, batch, async, resume)."""

    clvr_context: Any = None

    @property
    def graph(self):
        """The compiled LangGraph graph: ``get_state``, ``update_state``, ``get_graph`` for durable runs."""
        return self.bound

    def get_state(self, config, **kw):
        return self.bound.get_state(config, **kw)

    def cancel(self) -> None:
        """Ask the running executor to stop after its current denoising step."""
        self.clvr_context.cancel.set()


@functools.lru_cache(maxsize=1)
def default_context() -> ClvrContext:
    """The embedded backend, for runs that arrive without a context (LangGraph Studio); one per process."""
    return build_context("shapeworld")


class ClvrToolInput(BaseModel):
    prompt: str = Field(description="What the image must show; every object, count, colour and relation.")
    seed: Optional[int] = Field(None, description="Seed for a reproducible image.")


def summarize_result(result: dict) -> str:
    """One compact line for an agent: status, final image, iterations, unmet constraints."""
    traj = result.get("trajectory") or {}
    unmet: list[str] = []
    scored = [s for s in traj.get("steps", []) if s.get("verdict") and s.get("canvas")]
    final = result.get("final_image")
    for s in scored:
        if s["canvas"]["path"] == final:
            unmet = [c["detail"] or c["id"] for c in s["verdict"]["constraints"] if not c["satisfied"]]
    text = f"status={result.get('status')} image={final} iterations={result.get('iterations')}"
    return text + (f" unmet: {'; '.join(unmet)}" if unmet else "")


def clvr_tool(runnable: Optional[Runnable] = None, **settings: Any) -> BaseTool:
    """A LangChain tool that draws an image with the CLVR loop and returns a compact result."""
    loop = runnable or create_clvr(**settings)

    def draw(prompt: str, seed: Optional[int] = None) -> str:
        inp: dict = {"prompt": prompt}
        if seed is not None:
            inp["seed"] = seed
        return summarize_result(loop.invoke(inp))

    async def adraw(prompt: str, seed: Optional[int] = None) -> str:
        inp: dict = {"prompt": prompt}
        if seed is not None:
            inp["seed"] = seed
        return summarize_result(await loop.ainvoke(inp))

    return StructuredTool.from_function(
        func=draw, coroutine=adraw, name="clvr_generate_image", args_schema=ClvrToolInput,
        description="Generate an image that satisfies a detailed prompt by planning, drawing, verifying "
        "and correcting it in a loop. Returns the image path, status and any unmet constraints.",
    )
