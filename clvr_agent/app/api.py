"""The public entry points: ``create_clvr`` (a LangChain Runnable) and ``clvr_tool`` (a BaseTool)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any, AsyncIterator, Iterator, Optional, Union

from langchain_core.runnables import Runnable, RunnableBinding
from pydantic import Field, ValidationError

from clvr_agent.app.agent_tool import clvr_tool, summarize_result  # noqa: F401 - re-exported (0.1 import path)
from clvr_agent.graphs.graph import build_graph
from clvr_agent.protocols import Controller, Executor
from clvr_agent.state import ClvrContext, ClvrInput, input_error
from clvr_agent.tools import registry


def _live_controller(controller: Any, options: dict) -> Optional[Controller]:
    """A controller object for the context: a Controller as is, a LangChain chat model wrapped."""
    from langchain_core.language_models import BaseChatModel

    if isinstance(controller, BaseChatModel):
        from clvr_agent.tools.chat_controller import ChatModelController

        return ChatModelController(controller, **options)
    if isinstance(controller, Controller):
        return controller
    raise ValueError(f"controller must be a backend name, a Controller or a LangChain chat model, got {type(controller).__name__}")


def make_context(
    backend: Union[str, Executor] = "shapeworld",
    *,
    controller: Any = None,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    **settings: Any,
) -> ClvrContext:
    """A validated context; backend names are checked, nothing is loaded yet."""
    data: dict = dict(executor_options=executor_options or {}, controller_options=controller_options or {})
    if isinstance(backend, str):
        registry.check_name("executor", backend)
        data["backend"] = backend
    else:
        data.update(backend=getattr(backend, "name", "custom"), executor=backend)
    if isinstance(controller, str):
        registry.check_name("controller", controller)
        data["controller"] = controller
    elif controller is not None:
        data["controller"] = _live_controller(controller, controller_options or {})
    try:
        return ClvrContext(**data, **settings).use_backends(registry)
    except ValidationError as exc:
        raise ValueError(f"invalid setting {input_error(exc)}") from None


def build_context(backend: Union[str, Executor] = "shapeworld", **kw: Any) -> ClvrContext:
    """:func:`make_context`, then load both models now (each once per process), so a backend
    that cannot load fails here rather than in the first run."""
    ctx = make_context(backend, **kw)
    ctx.get_executor()
    ctx.get_controller()
    return ctx


def create_clvr(
    backend: Union[str, Executor] = "shapeworld",
    *,
    checkpointer: Any = None,
    controller: Any = None,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    context: Union[ClvrContext, dict, None] = None,
    **settings: Any,
) -> "ClvrRunnable":
    """The compiled CLVR graph with its configuration bound, as a LangChain Runnable.

    ``invoke({"prompt": ...})`` returns ``status``, ``final_image`` (its path), ``iterations`` and ``trajectory``.
    ``stream`` supports the ``updates``, ``values`` and ``custom`` modes; ``batch``, ``ainvoke`` and
    ``astream`` work as on any Runnable. Settings are the fields of :class:`~clvr_agent.state.Settings`.
    Models load on the first run (once per process); every run gets its own cancel flag.
    """
    if isinstance(context, dict):
        context = make_context(**context)
    ctx = context or make_context(backend, controller=controller, executor_options=executor_options,
                                  controller_options=controller_options, **settings)
    ctx.use_backends(registry)
    graph = build_graph(interactive=ctx.interactive, backends=registry).compile(checkpointer=checkpointer, name="clvr")
    return ClvrRunnable(bound=graph, kwargs={"context": ctx}, clvr_context=ctx)


def check_input(inputs: Any) -> Any:
    """Validate a run's input before any model runs; ``None`` and ``Command`` (resume) pass through."""
    if isinstance(inputs, dict):
        try:
            ClvrInput.model_validate(inputs)
        except ValidationError as exc:
            raise ValueError(input_error(exc)) from None
    return inputs


class ClvrRunnable(RunnableBinding):
    """The compiled graph with its context bound to every call (invoke, stream, batch, async, resume).

    Each call runs with its own copy of the context (:meth:`ClvrContext.for_run`), registered under
    the call's ``run_id`` (from ``config["run_id"]``, else a new one) so :meth:`cancel` can stop
    one run of a shared runnable and leave the others, and later runs, untouched.
    """

    clvr_context: Any = None
    # run_id -> that run's context; fields, not private attributes (RunnableBinding forwards unknown
    # attribute reads to the bound graph)
    run_contexts: dict = Field(default_factory=dict, exclude=True)
    run_lock: Any = Field(default_factory=threading.Lock, exclude=True)

    @property
    def graph(self):
        """The compiled LangGraph graph: ``get_state``, ``update_state``, ``get_graph`` for durable runs."""
        return self.bound

    @contextlib.contextmanager
    def _run(self, config: Any):
        config = self._merge_configs(config)
        run_id = str(config.setdefault("run_id", uuid.uuid4()))
        run = self.clvr_context.for_run()
        with self.run_lock:
            self.run_contexts[run_id] = run
        try:
            yield config, run
        finally:
            with self.run_lock:
                self.run_contexts.pop(run_id, None)

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        check_input(input)
        with self._run(config) as (cfg, run):
            return self.bound.invoke(input, cfg, **{**kwargs, "context": run})

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        check_input(input)
        with self._run(config) as (cfg, run):
            return await self.bound.ainvoke(input, cfg, **{**kwargs, "context": run})

    def stream(self, input: Any, config: Any = None, **kwargs: Any) -> Iterator[Any]:
        check_input(input)
        with self._run(config) as (cfg, run):
            yield from self.bound.stream(input, cfg, **{**kwargs, "context": run})

    async def astream(self, input: Any, config: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        check_input(input)
        with self._run(config) as (cfg, run):
            async for chunk in self.bound.astream(input, cfg, **{**kwargs, "context": run}):
                yield chunk

    def batch(self, inputs: list, config: Any = None, **kwargs: Any) -> list:
        for item in inputs:
            check_input(item)
        return Runnable.batch(self, inputs, config, **kwargs)  # one invoke (one run) per input

    async def abatch(self, inputs: list, config: Any = None, **kwargs: Any) -> list:
        for item in inputs:
            check_input(item)
        return await Runnable.abatch(self, inputs, config, **kwargs)

    def active_runs(self) -> list[str]:
        """The run ids of this runnable's runs in progress."""
        with self.run_lock:
            return list(self.run_contexts)

    def cancel(self, run_id: Any = None) -> int:
        """Stop one run (by its ``run_id``) after its executor's current denoising step; with no
        id, every run of this runnable in progress. Returns how many runs were asked to stop."""
        with self.run_lock:
            runs = list(self.run_contexts.values()) if run_id is None else [self.run_contexts.get(str(run_id))]
        runs = [r for r in runs if r is not None]
        for run in runs:
            run.cancel()
        return len(runs)
