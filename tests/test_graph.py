"""The loop's nodes, routers and runnable surface, with a scripted controller and a pixel executor."""

from __future__ import annotations

import asyncio
import sqlite3

import numpy as np
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command
from PIL import Image

from clvr_agent.app.api import build_context, create_clvr
from clvr_agent.graphs.graph import build_request, route_after_verify
from clvr_agent.state import ClvrContext, Settings
from clvr_agent.protocols import GenerationOutput
from clvr_agent.errors import ControllerOutputError
from clvr_agent.tools.scripted import ScriptedController
from clvr_agent.types import Correction, ExecutorRequest, Plan, Constraint


class PixelExecutor:
    """Draws a 64x64 canvas whose colour depends on the seed and how many references it saw."""

    name = "pixels"

    def __init__(self, fail_times: int = 0):
        self.requests: list[ExecutorRequest] = []
        self.reference_pixels: list[list[tuple]] = []
        self.fail_times = fail_times

    def generate(self, request, references, progress=None):
        self.requests.append(request)
        self.reference_pixels.append([r.getpixel((0, 0)) for r in references])
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("device lost")
        for i in range(2):
            if progress and progress(i, 2):
                from clvr_agent.errors import Cancelled

                raise Cancelled()
        rng = np.random.default_rng(request.seed)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        return GenerationOutput(image=Image.new("RGB", (64, 64), colour), nfe=2)


def make(scores=(0.5, 1.0), passive=(), tmp_path=None, checkpointer=None, fail_times=0, **settings):
    ex = PixelExecutor(fail_times=fail_times)
    ctl = ScriptedController(scores=scores, passive=passive)
    ctx = ClvrContext(executor=ex, controller=ctl, settings=Settings(artifact_dir=str(tmp_path), **settings))
    return create_clvr(context=ctx, checkpointer=checkpointer), ex, ctl


def test_two_iteration_loop_conditions_on_prior_canvas(tmp_path):
    run, ex, ctl = make(tmp_path=tmp_path)
    out = run.invoke({"prompt": "a red circle", "seed": 3})
    assert out["status"] == "satisfied" and out["iterations"] == 2
    assert ctl.calls == ["plan", "check_step", "verify", "correct", "check_step", "verify"]
    first, second = ex.requests
    assert first.mode == "generate" and first.references == []
    assert second.mode == "edit" and [r.sha256 for r in second.references] == [
        out["trajectory"]["steps"][0]["canvas"]["sha256"]
    ]
    # the executor really received the prior canvas's pixels
    prior = Image.open(out["trajectory"]["steps"][0]["canvas"]["path"]).getpixel((0, 0))
    assert ex.reference_pixels[1] == [prior]
    assert "add a blue square" in second.accumulated_prompt and "a red circle" in second.accumulated_prompt
    assert out["final_image"] == out["trajectory"]["steps"][1]["canvas"]["path"]


def test_reference_window_keeps_last_k(tmp_path):
    run, ex, _ = make(scores=(0.1, 0.2, 0.3, 0.4, 1.0), tmp_path=tmp_path, reference_window=2)
    run.invoke({"prompt": "p"})
    assert [len(r.references) for r in ex.requests] == [0, 1, 2, 2, 2]


def test_budget_exhausted_returns_best_canvas(tmp_path):
    run, _, _ = make(scores=(0.2, 0.9, 0.5), tmp_path=tmp_path, max_iterations=3, patience=5)
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "budget_exhausted" and out["iterations"] == 3
    steps = out["trajectory"]["steps"]
    assert out["final_image"] == steps[1]["canvas"]["path"]  # score 0.9, not the last


def test_no_progress_stops(tmp_path):
    run, _, _ = make(scores=(0.6, 0.5, 0.5, 0.4), tmp_path=tmp_path, patience=2)
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "no_progress" and out["iterations"] == 3


def test_max_iterations_from_input(tmp_path):
    run, _, _ = make(scores=(0.1,), tmp_path=tmp_path, patience=10)
    out = run.invoke({"prompt": "p", "max_iterations": 2})
    assert out["status"] == "budget_exhausted" and out["iterations"] == 2


def test_passive_retry_redraws_without_advancing(tmp_path):
    run, ex, ctl = make(scores=(1.0,), passive=(False, False, True), tmp_path=tmp_path, passive_retries=2)
    out = run.invoke({"prompt": "p"})
    steps = out["trajectory"]["steps"]
    assert [s["accepted"] for s in steps] == [False, False, True]
    assert [s["iteration"] for s in steps] == [1, 1, 1]
    assert len({r.seed for r in ex.requests}) == 3  # a new seed each retry
    assert out["status"] == "satisfied" and out["iterations"] == 1


def test_executor_failure_stops_failed_and_keeps_artifacts(tmp_path):
    run, ex, _ = make(scores=(0.5, 1.0), tmp_path=tmp_path, executor_retries=1)
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "satisfied"
    ex.fail_times = 5  # the next run fails on its first call, and on the retry
    out = run.invoke({"prompt": "q"})
    assert out["status"] == "failed" and "device lost" in out["stop_reason"]
    assert out["trajectory"]["steps"][0]["error"].startswith("RuntimeError")


def test_executor_failure_mid_run_keeps_earlier_canvas(tmp_path):
    run, ex, ctl = make(scores=(0.5, 1.0), tmp_path=tmp_path, executor_retries=0)
    orig = ex.generate

    def flaky(request, refs, progress=None):
        if request.mode == "edit":
            raise RuntimeError("out of memory")
        return orig(request, refs, progress)

    ex.generate = flaky
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "failed"
    assert out["final_image"] is not None and out["final_image"] == out["trajectory"]["steps"][0]["canvas"]["path"]


class BrokenController(ScriptedController):
    def plan(self, prompt):
        raise ControllerOutputError("unparsable")

    def verify(self, *a):
        raise ControllerOutputError("unparsable verdict")


def test_broken_controller_degrades_to_single_step(tmp_path):
    ex = PixelExecutor()
    ctx = ClvrContext(executor=ex, controller=BrokenController(), settings=Settings(artifact_dir=str(tmp_path)))
    out = create_clvr(context=ctx).invoke({"prompt": "a cat"})
    assert out["status"] == "failed" and len(ex.requests) == 1
    traj = out["trajectory"]
    assert traj["plan"]["fallback"] is True and traj["plan"]["first_instruction"] == "a cat"
    assert out["final_image"] is not None


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 3000])
def test_bad_prompt_is_a_clear_error(tmp_path, prompt):
    run, _, _ = make(tmp_path=tmp_path)
    with pytest.raises(ValueError, match="prompt"):
        run.invoke({"prompt": prompt})


def test_stream_modes_and_custom_events(tmp_path):
    run, _, _ = make(tmp_path=tmp_path)
    chunks = list(run.stream({"prompt": "p"}, stream_mode=["updates", "values", "custom"]))
    modes = {m for m, _ in chunks}
    assert modes == {"updates", "values", "custom"}
    events = [c for m, c in chunks if m == "custom"]
    kinds = [e["event"] for e in events]
    assert "denoise" in kinds and "iteration" in kinds and kinds[-1] == "stop"
    assert [e["node"] for e in events if e["event"] == "node_start"][:3] == ["plan", "generate", "verify"]
    updates = [list(c) for m, c in chunks if m == "updates"]
    assert updates[0] == ["plan"]


def test_batch_and_ainvoke(tmp_path):
    run, _, _ = make(scores=(1.0,), tmp_path=tmp_path)
    outs = run.batch([{"prompt": "a"}, {"prompt": "b"}])
    assert [o["status"] for o in outs] == ["satisfied", "satisfied"]
    out = asyncio.run(run.ainvoke({"prompt": "c"}))
    assert out["status"] == "satisfied"

    async def collect():
        return [c async for c in run.astream({"prompt": "d"}, stream_mode="updates")]

    assert list(asyncio.run(collect())[-1]) == ["stop"]


class Crash(BaseException):
    """Stands in for the process being killed inside a node."""


def test_resume_after_crash_reaches_same_image(tmp_path):
    ref_run, _, _ = make(scores=(0.3, 0.6, 1.0), tmp_path=tmp_path / "a")
    expected = ref_run.invoke({"prompt": "p", "seed": 7})

    conn = sqlite3.connect(str(tmp_path / "ck.sqlite"), check_same_thread=False)
    run, ex, ctl = make(scores=(0.3, 0.6, 1.0), tmp_path=tmp_path / "b", checkpointer=SqliteSaver(conn))
    orig = ctl.correct
    calls = {"n": 0}

    def crash_once(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash()
        return orig(*a)

    ctl.correct = crash_once
    cfg = {"configurable": {"thread_id": "t1"}}
    with pytest.raises(Crash):
        run.invoke({"prompt": "p", "seed": 7}, cfg)
    done_before = len(ex.requests)
    assert done_before == 2
    out = run.invoke(None, cfg)
    assert len(ex.requests) == 3  # completed generate steps were not redone
    assert out["status"] == "satisfied"
    assert Image.open(out["final_image"]).tobytes() == Image.open(expected["final_image"]).tobytes()


def test_interactive_pauses_after_plan_and_before_stop(tmp_path):
    run, ex, _ = make(scores=(1.0,), tmp_path=tmp_path, checkpointer=InMemorySaver(), interactive=True)
    cfg = {"configurable": {"thread_id": "h"}}
    first = run.invoke({"prompt": "two red circles"}, cfg)
    assert first["__interrupt__"][0].value["kind"] == "approve_plan"
    assert ex.requests == []
    edited = Plan(constraints=[Constraint(id="c0", text="two red circles")], first_instruction="two red circles, big")
    second = run.invoke(Command(resume=edited.model_dump()), cfg)
    assert second["__interrupt__"][0].value["kind"] == "approve_stop"
    assert ex.requests[0].instruction == "two red circles, big"
    final = run.invoke(Command(resume=True), cfg)
    assert final["status"] == "satisfied"


def test_build_request_accumulates_instructions(tmp_path):
    """prompt + every accepted step's instruction + the pending one, in order; rejected steps and a
    repeat of the prompt are left out; the last K canvases are the references of an edit."""
    from clvr_agent.types import ImageRef, Step

    ctx = ClvrContext(settings=Settings(artifact_dir=str(tmp_path), reference_window=2))

    def step(i, instruction, accepted=True):
        ref = ImageRef(path=f"/c{i}.png", sha256=str(i) * 8, width=8, height=8, size_bytes=1)
        req = ExecutorRequest(mode="edit", instruction=instruction, accumulated_prompt="", seed=0)
        return Step(index=i, iteration=i + 1, instruction=instruction, request=req, canvas=ref, accepted=accepted)

    steps = [step(0, "p"), step(1, "add a blue square"), step(2, "recolor the star", accepted=False),
             step(3, "move the circle left")]
    state = {"prompt": "p", "seed": 1, "steps": steps, "pending": Correction(instruction="remove the cross")}
    req = build_request(state, ctx)
    assert req.accumulated_prompt == "p\nadd a blue square\nmove the circle left\nremove the cross"
    assert req.mode == "edit" and [r.path for r in req.references] == ["/c1.png", "/c3.png"]
    assert req.seed != build_request({**state, "steps": steps[:3]}, ctx).seed  # the step index moves the seed
    fresh = build_request({**state, "pending": Correction(instruction="redraw", mode="generate")}, ctx)
    assert fresh.mode == "generate" and fresh.references == []


def test_unknown_backend_lists_known():
    from clvr_agent.errors import UnknownBackendError

    with pytest.raises(UnknownBackendError, match="known: .*shapeworld"):
        build_context("nope")


def test_state_checkpoints_hold_no_pixels(tmp_path):
    """Every checkpointed value is a record or a primitive: strict msgpack (no pickle fallback) can
    write it, and a leaked PIL image or array could not pass."""
    from clvr_agent.state import checkpoint_serde
    from clvr_agent.types import _Record

    saver = InMemorySaver(serde=checkpoint_serde())
    run, _, _ = make(tmp_path=tmp_path, checkpointer=saver)
    run.invoke({"prompt": "p"}, {"configurable": {"thread_id": "x"}})
    primitives = (str, int, float, bool, type(None))

    def plain(value) -> bool:
        if isinstance(value, _Record):
            return all(plain(v) for v in value.__dict__.values())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return isinstance(value, primitives)

    for snapshot in run.graph.get_state_history({"configurable": {"thread_id": "x"}}):
        for key, value in snapshot.values.items():
            assert plain(value), key
    assert not plain(Image.new("RGB", (2, 2))) and not plain([np.zeros(2)])  # the check itself can fail


def test_starting_reference_is_edited_not_redrawn(tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(start)
    run, ex, _ = make(scores=(1.0,), tmp_path=tmp_path / "art")
    out = run.invoke({"prompt": "p", "references": [str(start)]})
    assert ex.requests[0].mode == "edit" and ex.reference_pixels[0] == [(1, 2, 3)]
    assert out["status"] == "satisfied"


def test_unreadable_reference_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    run, ex, _ = make(tmp_path=tmp_path / "art")
    with pytest.raises(ValueError, match="not a readable image"):
        run.invoke({"prompt": "p", "references": [str(bad)]})
    with pytest.raises(ValueError, match="not found"):
        run.invoke({"prompt": "p", "references": [str(tmp_path / "missing.png")]})
    assert ex.requests == []


def _runtime(ctx):
    from langgraph.runtime import Runtime

    return Runtime(context=ctx)


def test_nodes_on_their_own(tmp_path):
    from clvr_agent.graphs.graph import correct_canvas, generate_canvas, plan_prompt, stop_run, verify_canvas

    ex, ctl = PixelExecutor(), ScriptedController(scores=(0.5,))
    ctx = ClvrContext(executor=ex, controller=ctl, settings=Settings(artifact_dir=str(tmp_path)))
    rt = _runtime(ctx)
    state = {"prompt": "  a red circle ", "seed": 2}
    state.update(plan_prompt(state, rt))
    assert state["prompt"] == "a red circle" and state["iterations"] == 1 and state["pending"].mode == "generate"
    update = generate_canvas(state, rt)
    assert sorted(update) == ["model_calls", "steps"] and update["steps"][0].canvas.width == 64
    assert [(c.model, c.method) for c in update["model_calls"]] == [("executor", "generate")]
    state["steps"] = update["steps"]
    update = verify_canvas(state, rt)
    assert update["steps"][0].verdict.score == 0.5 and update["attempt"] == 0
    state["steps"] = update["steps"]
    assert route_after_verify(state, rt) == "correct"
    update = correct_canvas(state, rt)
    assert update["iterations"] == 2 and update["pending"].instruction.startswith("add")
    state["max_iterations"] = 1
    final = stop_run(state, rt)
    assert final["status"] == "budget_exhausted" and final["final_image"] == state["steps"][0].canvas.path
    assert final["trajectory"]["steps"][0]["verdict"]["score"] == 0.5


def test_second_run_loads_nothing(tmp_path):
    from clvr_agent.tools import registry

    registry.clear_cache()
    for i in range(2):
        create_clvr("shapeworld", artifact_dir=str(tmp_path)).invoke({"prompt": "a photo of a red circle", "seed": i})
    assert registry.LOAD_COUNTS == {"executor:shapeworld": 1, "controller:shapeworld": 1}
