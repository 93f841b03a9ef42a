"""The runtime contract: a context LangGraph can build from a dict, per-run cancel and timings,
model calls as named child runs a tracer can read."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from clvr_agent import create_clvr
from clvr_agent.graphs.graph import build_graph
from clvr_agent.state import ClvrContext, Settings
from clvr_agent.errors import Cancelled
from clvr_agent.tools.scripted import ScriptedController
from tests.test_graph import PixelExecutor

PROMPT = "a photo of two red circles left of a blue square"


def test_graph_invoke_with_empty_context_runs_the_embedded_defaults():
    """What a LangGraph server does: build the context schema from the run's (empty) dict, on the
    graph the server serves (the shipped backends wired in)."""
    from clvr_agent.app.studio import graph

    out = graph.invoke({"prompt": PROMPT, "seed": 1}, context={})
    assert out["status"] == "satisfied"
    assert out["trajectory"]["backend"] == "shapeworld" and out["trajectory"]["controller"] == "shapeworld"


def test_a_graph_without_backends_names_what_is_missing_instead_of_picking_one():
    """The graph room knows no backend: a context that only names one fails the run, saying how to fix it."""
    from clvr_agent.errors import NoBackendsError

    with pytest.raises(NoBackendsError, match=r"no controller: .*build_graph\(backends=clvr_agent.tools.registry\)"):
        build_graph().compile().invoke({"prompt": PROMPT, "seed": 1}, context={})
    ex, ctl = PixelExecutor(), ScriptedController(scores=(1.0,))
    ctx = ClvrContext(executor=ex, controller=ctl)
    assert build_graph().compile().invoke({"prompt": "p"}, context=ctx)["status"] == "satisfied"


def test_context_dict_is_obeyed_and_schema_is_plain_data():
    from clvr_agent.tools import registry

    graph = build_graph(backends=registry).compile()
    out = graph.invoke({"prompt": PROMPT, "seed": 3}, context={"max_iterations": 1, "patience": 1})
    assert out["iterations"] == 1
    schema = graph.get_context_jsonschema()
    assert {"backend", "controller", "executor_options", "max_iterations"} <= set(schema["properties"])
    assert all("default" in v or k.endswith("_options") for k, v in schema["properties"].items())
    with pytest.raises(ValueError, match="max_iterations"):
        graph.invoke({"prompt": PROMPT}, context={"max_iterations": 0})


def test_python_objects_still_ride_along(tmp_path):
    ex, ctl = PixelExecutor(), ScriptedController(scores=(1.0,))
    out = create_clvr(ex, controller=ctl, artifact_dir=str(tmp_path)).invoke({"prompt": "p"})
    assert out["status"] == "satisfied" and len(ex.requests) == 1 and ctl.calls[0] == "plan"
    ctx = ClvrContext(executor=ex, controller=ctl, settings=Settings(max_iterations=3))
    assert ctx.max_iterations == 3 and ctx.get_executor() is ex and "executor" not in ctx.model_dump()


class GateExecutor(PixelExecutor):
    """Draws only once ``release`` is set, checking its progress callback (and so cancel) meanwhile."""

    def __init__(self):
        super().__init__()
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def generate(self, request, references, progress=None):
        self.started.release()
        while not self.release.wait(0.01):
            if progress and progress(0, 2):
                raise Cancelled()
        return super().generate(request, references, progress)


def test_cancel_stops_one_run_of_a_shared_runnable(tmp_path):
    ex = GateExecutor()
    run = create_clvr(ex, controller=ScriptedController(scores=(1.0,)), artifact_dir=str(tmp_path))
    ids = [str(uuid.uuid4()) for _ in range(2)]
    results: dict = {}

    def go(rid):
        results[rid] = run.invoke({"prompt": "p"}, {"run_id": rid})

    threads = [threading.Thread(target=go, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    for _ in ids:
        assert ex.started.acquire(timeout=30)  # both runs are inside the executor
    assert sorted(run.active_runs()) == sorted(ids)
    assert run.cancel(ids[0]) == 1
    deadline = time.monotonic() + 30
    while ids[0] not in results and time.monotonic() < deadline:
        time.sleep(0.01)
    ex.release.set()
    for t in threads:
        t.join(30)
    assert results[ids[0]]["status"] == "failed" and "cancelled" in results[ids[0]]["stop_reason"]
    assert results[ids[1]]["status"] == "satisfied"
    assert run.active_runs() == []
    assert run.invoke({"prompt": "p"})["status"] == "satisfied"  # the runnable stays usable


def test_timings_are_per_run_and_once_per_model_call(tmp_path):
    ctl = ScriptedController(scores=(0.5, 1.0), passive=(False, True, True))
    run = create_clvr(PixelExecutor(), controller=ctl, artifact_dir=str(tmp_path))
    first = run.invoke({"prompt": "p"})
    calls = first["trajectory"]["model_calls"]
    # one record per controller call (a passive retry included) and per executor call
    assert [c["method"] for c in calls if c["model"] == "controller"] == ctl.calls
    assert sum(c["model"] == "executor" for c in calls) == 3
    ctl.reset()
    second = run.invoke({"prompt": "p"})
    assert len(second["trajectory"]["model_calls"]) == len(calls)  # nothing carried over between runs


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.runs: list[tuple[str, dict, list]] = []

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
        self.runs.append((kw.get("name") or (serialized or {}).get("name"), metadata or {}, tags or []))


def test_tracer_sees_nodes_and_model_calls_with_metadata(tmp_path):
    rec = Recorder()
    run = create_clvr("shapeworld", artifact_dir=str(tmp_path))
    out = run.invoke({"prompt": PROMPT, "seed": 5}, {"callbacks": [rec]})
    names = [n for n, _, _ in rec.runs]
    for node in ("plan", "generate", "verify", "stop"):
        assert node in names
    if out["iterations"] > 1:
        assert "correct" in names
    model_runs = [(n, m, t) for n, m, t in rec.runs if n.startswith(("executor.", "controller."))]
    assert {n for n, _, _ in model_runs} >= {"controller.plan", "executor.generate", "controller.check_step",
                                            "controller.verify"}
    gen = next(m for n, m, _ in model_runs if n == "executor.generate")
    assert gen["clvr_prompt"] == PROMPT and gen["clvr_seed"] == 5 and gen["clvr_backend"] == "shapeworld"
    assert gen["clvr_iteration"] == 1 and gen["clvr_step"] == 0 and gen["langgraph_node"] == "generate"
    assert all("clvr" in t for _, _, t in model_runs)


def test_cancelling_an_async_run_stops_its_executor(tmp_path):
    """A LangGraph server cancels a run's task: the draw in flight must stop, not run to its end."""
    import asyncio

    from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor

    class Watched(ShapeWorldExecutor):
        started, ended = threading.Event(), None

        def generate(self, *a, **kw):
            Watched.started.set()
            try:
                return super().generate(*a, **kw)
            finally:
                Watched.ended = time.monotonic()

    run = create_clvr(Watched(latency_s=30, denoise_steps=300), controller="shapeworld",
                      artifact_dir=str(tmp_path))

    async def main():
        task = asyncio.ensure_future(run.ainvoke({"prompt": PROMPT}))
        deadline = time.monotonic() + 60  # cancel while the draw is in flight, however slow the plan node is here
        while not Watched.started.is_set():
            assert time.monotonic() < deadline, "the executor never started drawing"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return t0

    t0 = asyncio.run(main())
    assert Watched.ended is not None and Watched.ended - t0 < 5  # one 0.1 s denoising step, not 29 s
