"""The CLVR loop as a LangGraph ``StateGraph``: plan -> generate -> verify -> (correct -> generate)* -> stop.

Nodes are small functions of ``(state, runtime)`` returning partial updates. ``runtime.context`` is
a :class:`~clvr_agent.state.ClvrContext`: plain configuration whose backend names resolve through the
:class:`~clvr_agent.protocols.Backends` the graph is built with (or objects a Python caller handed in).
This module imports only the core: no concrete model, no registry, no app.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Literal, Optional

from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime, get_runtime
from langgraph.types import interrupt
from PIL import Image
from pydantic import ValidationError

from clvr_agent.protocols import Backends
from clvr_agent.seeds import step_seed
from clvr_agent.state import ClvrContext, ClvrInput, ClvrOutput, ClvrState, input_error, validate_prompt
from clvr_agent.store import load_reference_image
from clvr_agent.protocols import GenerationOutput
from clvr_agent.errors import Cancelled, ControllerCallError, ControllerOutputError
from clvr_agent.types import IMAGE_ROOT, Constraint, Correction, ExecutorRequest, ModelCall, Plan, Step, Trajectory

# ---------------------------------------------------------------- helpers


def _ctx(runtime: Runtime) -> ClvrContext:
    """The run's configuration; a graph invoked with no context at all runs the schema's defaults.

    Also points relative image paths (a run folder's store) at that folder for this node."""
    ctx = ClvrContext() if runtime.context is None else runtime.context
    if ctx.store.base is not None:
        IMAGE_ROOT.set(str(ctx.store.base))
    return ctx


def accepted_canvases(steps: list[Step]) -> list[Step]:
    return [s for s in steps if s.accepted and s.canvas is not None]


def best_step(steps: list[Step]) -> Optional[Step]:
    """The accepted step with the highest verifier score; the later one wins ties."""
    scored = [s for s in accepted_canvases(steps) if s.verdict is not None]
    if not scored:
        done = accepted_canvases(steps)
        return done[-1] if done else None
    return max(reversed(scored), key=lambda s: s.verdict.score)


def stop_decision(state: ClvrState, ctx: ClvrContext) -> Optional[tuple[str, str]]:
    """(status, reason) when the run must stop now, else None. Shared by the router and ``stop``."""
    if state.get("status") == "failed":
        return "failed", state.get("stop_reason", "failed")
    steps = state.get("steps", [])
    last = steps[-1] if steps else None
    if last is None or last.verdict is None:
        return None
    if last.verdict.satisfied:
        return "satisfied", f"all constraints met at iteration {state['iterations']}"
    max_it = state.get("max_iterations") or ctx.max_iterations
    if state["iterations"] >= max_it:
        return "budget_exhausted", f"{max_it} iterations used"
    patience = ctx.patience
    scores = [s.verdict.score for s in accepted_canvases(steps) if s.verdict is not None]
    if len(scores) > patience and max(scores[-patience:]) <= max(scores[:-patience]):
        return "no_progress", f"no better score in the last {patience} iterations"
    return None


class ModelCalls:
    """Runs model calls as named child runs and records each one once (``state.model_calls``).

    Every call goes through a ``RunnableLambda`` named ``executor.generate``, ``controller.verify``
    and so on, inside the node's run, so LangChain callbacks and LangSmith show the loop as it ran,
    with the run's prompt, seed, backends, iteration and step as metadata.
    """

    def __init__(self, node: str, state: ClvrState, ctx: ClvrContext, step: Optional[int] = None):
        self.node, self.step, self.records = node, step, []
        self.meta = {"clvr_prompt": state.get("prompt", ""), "clvr_seed": state.get("seed"),
                     "clvr_iteration": state.get("iterations", 0), "clvr_node": node,
                     "clvr_backend": ctx.backend, "clvr_controller": ctx.controller or "default"}

    def __call__(self, model: str, method: str, fn: Callable, *args: Any, trace_input: Any = None) -> Any:
        result: dict = {}

        def call(_: Any) -> Any:
            result["value"] = fn(*args)
            return _summary(result["value"])

        t0 = time.perf_counter()
        ok = False
        try:
            RunnableLambda(call, name=f"{model}.{method}").invoke(
                trace_input or {}, {"metadata": {**self.meta, "clvr_step": self.step},
                                    "tags": ["clvr", f"clvr:{model}"]})
            ok = True
            return result["value"]
        finally:
            self.records.append(ModelCall(node=self.node, model=model, method=method, step=self.step,
                                          seconds=time.perf_counter() - t0, ok=ok))


def _summary(value: Any) -> Any:
    """What a trace shows as a model call's output: records as JSON, an image as its size and NFE."""
    if isinstance(value, GenerationOutput):
        size = getattr(value.image, "size", None)
        return {"nfe": value.nfe, "image_size": list(size) if size else None, "seconds": value.seconds}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def _controller_call(calls: ModelCalls, ctx: ClvrContext, method: str, *args: Any) -> Any:
    """A controller call with retries for anything but an unusable reply (network errors included).

    ``ControllerOutputError`` (the model answered, but not validly) is not retried here: the
    controller already fed the error back to the model. Any other exception is retried
    ``controller_retries`` times, then raised as ``ControllerCallError``.
    """
    controller = ctx.get_controller()
    for attempt in range(ctx.controller_retries + 1):
        try:
            return calls("controller", method, getattr(controller, method), *args)
        except (ControllerOutputError, Cancelled):
            raise
        except Exception as exc:  # an API/network/model failure: retried, then reported, never swallowed
            if attempt == ctx.controller_retries:
                raise ControllerCallError(f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- nodes


def check_run_input(state: ClvrState) -> None:
    """The input schema, applied to what reached the graph (a server or a bare graph does not
    validate input itself): raises ValueError naming the field before any model runs."""
    given = {k: state[k] for k in ClvrInput.model_fields if k in state}
    try:
        ClvrInput.model_validate(given)
    except ValidationError as exc:
        raise ValueError(input_error(exc)) from None


def plan_prompt(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    check_run_input(state)
    prompt = validate_prompt(state.get("prompt"), ctx.max_prompt_chars)
    seed = ctx.seed if state.get("seed") is None else state["seed"]
    init_refs = [ctx.store.put(load_reference_image(p)) for p in state.get("references") or []]
    run = {"prompt": prompt, "seed": seed, "iterations": 1, "attempt": 0, "status": "running",
           "max_iterations": state.get("max_iterations") or ctx.max_iterations, "init_references": init_refs}
    runtime.stream_writer({"event": "node_start", "node": "plan"})
    calls = ModelCalls("plan", {**state, **run}, ctx)
    try:
        plan = _controller_call(calls, ctx, "plan", prompt)
    except ControllerOutputError as exc:
        # A controller that answers badly degrades the loop to single-step generation, never to nothing.
        plan = Plan(constraints=[Constraint(id="c0", text=prompt, kind="other")], first_instruction=prompt,
                    reasoning=f"controller failed to plan: {exc}", fallback=True)
    except ControllerCallError as exc:
        return {**run, "model_calls": calls.records, "status": "failed",
                "stop_reason": f"controller failed to plan: {exc}"}
    runtime.stream_writer({"event": "node_end", "node": "plan", "constraints": len(plan.constraints)})
    pending = Correction(instruction=plan.first_instruction, mode="edit" if init_refs else "generate",
                         reasoning=plan.reasoning)
    return {**run, "plan": plan, "pending": pending, "model_calls": calls.records}


def review_plan(state: ClvrState) -> dict:
    """Human in the loop: resume with True to approve, or a plan dict to replace it."""
    answer = interrupt({"kind": "approve_plan", "plan": state["plan"].model_dump(mode="json")})
    if isinstance(answer, dict):
        plan = Plan.model_validate(answer)
        return {"plan": plan, "pending": Correction(instruction=plan.first_instruction, mode="generate")}
    return {}


def build_request(state: ClvrState, ctx: ClvrContext) -> ExecutorRequest:
    """Trajectory-accumulative conditioning: all instructions so far and the last K canvases."""
    steps = state.get("steps", [])
    pending = state["pending"]
    history = accepted_canvases(steps)
    canvases = list(state.get("init_references", [])) + [s.canvas for s in history]
    mode = "generate" if not canvases else pending.mode
    k = ctx.reference_window
    refs = canvases[-k:] if mode != "generate" and k else []
    instructions = [s.instruction for s in history] + [pending.instruction]
    accumulated = "\n".join([state["prompt"], *[i for i in instructions if i != state["prompt"]]])
    return ExecutorRequest(
        mode=mode, instruction=pending.instruction, accumulated_prompt=accumulated,
        references=refs, seed=step_seed(state["seed"], len(steps)), steps=ctx.steps,
        guidance=ctx.guidance, height=ctx.height, width=ctx.width, region=pending.region,
        region_prompt=pending.region_prompt,
    )


def _draw(calls: ModelCalls, ctx: ClvrContext, request: ExecutorRequest, progress: Callable) -> tuple:
    """(output, None) from the first executor attempt that succeeds, else (None, error text)."""
    refs = [r.open() for r in request.references]
    executor = ctx.get_executor()
    error = None
    for _ in range(ctx.executor_retries + 1):
        try:
            out = calls("executor", "generate", executor.generate, request, refs, progress,
                        trace_input={"mode": request.mode, "instruction": request.instruction,
                                     "seed": request.seed, "references": len(refs)})
        except Cancelled:
            return None, "cancelled"
        except Exception as exc:  # recorded on the step; the next attempt may succeed (a transient OOM)
            error = f"{type(exc).__name__}: {exc}"
            continue
        if not isinstance(out, GenerationOutput) or not isinstance(out.image, Image.Image):
            return None, f"executor returned {type(out).__name__}, not a GenerationOutput with a PIL image"
        return out, None
    return None, error


def generate_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    request = build_request(state, ctx)
    index, pending = len(state.get("steps", [])), state["pending"]
    runtime.stream_writer({"event": "node_start", "node": "generate", "step": index, "mode": request.mode})

    def progress(i: int, total: int) -> bool:
        runtime.stream_writer({"event": "denoise", "step": index, "i": i, "of": total})
        return ctx.cancelled

    step = Step(index=index, iteration=state["iterations"], attempt=state.get("attempt", 0),
                instruction=pending.instruction, reasoning=pending.reasoning, request=request)
    calls = ModelCalls("generate", state, ctx, step=index)
    out, error = _draw(calls, ctx, request, progress)
    if error is not None:
        step = step.model_copy(update={"error": error, "accepted": False})
        return {"steps": [step], "status": "failed", "stop_reason": f"executor failed: {error}",
                "model_calls": calls.records}
    t1 = time.perf_counter()
    canvas = ctx.store.put(out.image)
    step = step.model_copy(update={"canvas": canvas, "nfe": out.nfe, "timings": {
        "generate_s": out.seconds or calls.records[-1].seconds, "store_s": time.perf_counter() - t1}})
    runtime.stream_writer({"event": "node_end", "node": "generate", "step": index, "nfe": out.nfe})
    return {"steps": [step], "model_calls": calls.records}


async def agenerate_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    """The async form of ``generate`` (LangGraph servers run graphs async): the draw runs in a
    thread, and if the run is cancelled meanwhile the executor is told to stop after its current
    denoising step, so a cancelled run frees the accelerator instead of finishing its drawing."""
    draw = asyncio.ensure_future(asyncio.to_thread(generate_canvas, state, runtime))
    try:
        return await asyncio.shield(draw)
    except asyncio.CancelledError:
        _ctx(runtime).cancel()
        await asyncio.wait([draw], timeout=CANCEL_GRACE_S)
        raise


CANCEL_GRACE_S = 60.0  # how long a cancelled run waits for its executor to reach a denoising step


def verify_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    steps = state["steps"]
    step, attempt = steps[-1], state.get("attempt", 0)
    runtime.stream_writer({"event": "node_start", "node": "verify", "step": step.index})
    prior = accepted_canvases(steps[:-1])
    before = step.request.references[-1].open() if step.request.mode != "generate" and step.request.references else None
    after = step.canvas.open()
    calls = ModelCalls("verify", state, ctx, step=step.index)
    t0 = time.perf_counter()
    try:
        passive = _controller_call(calls, ctx, "check_step", step.instruction, before, after)
        if not passive.executed and attempt < ctx.passive_retries:
            rejected = step.model_copy(update={"passive": passive, "accepted": False})
            return {"steps": [rejected], "attempt": attempt + 1, "model_calls": calls.records}
        verdict = _controller_call(calls, ctx, "verify", state["prompt"], state["plan"], after, prior)
    except (ControllerOutputError, ControllerCallError) as exc:
        return {"status": "failed", "stop_reason": f"controller could not verify: {exc}",
                "steps": [step.model_copy(update={"error": str(exc)})], "model_calls": calls.records}
    timings = {**step.timings, "verify_s": time.perf_counter() - t0}
    step = step.model_copy(update={"passive": passive, "verdict": verdict, "timings": timings})
    runtime.stream_writer({"event": "iteration", "iteration": state["iterations"], "score": verdict.score,
           "satisfied": verdict.satisfied, "unmet": [c.id for c in verdict.unmet()]})
    return {"steps": [step], "attempt": 0, "model_calls": calls.records}


def correct_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    steps = state["steps"]
    last = accepted_canvases(steps)[-1]
    runtime.stream_writer({"event": "node_start", "node": "correct", "iteration": state["iterations"]})
    calls = ModelCalls("correct", state, ctx, step=last.index)
    try:
        correction = _controller_call(calls, ctx, "correct", state["prompt"], state["plan"], last.verdict,
                                      last.canvas.open(), steps)
    except (ControllerOutputError, ControllerCallError) as exc:
        return {"status": "failed", "stop_reason": f"controller could not correct: {exc}",
                "model_calls": calls.records}
    runtime.stream_writer({"event": "node_end", "node": "correct", "instruction": correction.instruction, "mode": correction.mode})
    return {"pending": correction, "iterations": state["iterations"] + 1, "attempt": 0, "model_calls": calls.records}


def review_stop(state: ClvrState) -> dict:
    """Human in the loop: confirm before the run ends (resume with any value)."""
    interrupt({"kind": "approve_stop", "iterations": state.get("iterations", 0)})
    return {}


def stop_run(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    status, reason = stop_decision(state, ctx) or ("failed", "stopped without a verdict")
    steps = state.get("steps", [])
    best = best_step(steps)
    final = best.canvas if best else None
    trajectory = Trajectory(
        prompt=state.get("prompt", ""), seed=state.get("seed", ctx.seed),
        backend=_name(ctx.get_executor), controller=_name(ctx.get_controller),
        plan=state.get("plan"), steps=steps, status=status, stop_reason=reason,
        final_canvas=final, iterations=state.get("iterations", 0), model_calls=state.get("model_calls", []),
    )
    runtime.stream_writer({"event": "stop", "status": status, "reason": reason})
    return {"status": status, "stop_reason": reason, "final_image": final.path if final else None,
            "iterations": state.get("iterations", 0), "trajectory": trajectory.model_dump(mode="json")}


def _name(get: Callable) -> str:
    """A backend's display name; a backend that cannot load (the reason the run failed) has none."""
    try:
        return getattr(get(), "name", "")
    except Exception:  # the load error is already the run's stop_reason
        return ""


# ---------------------------------------------------------------- routers


def route_after_plan(state: ClvrState) -> Literal["generate", "stop"]:
    return "stop" if state.get("status") == "failed" else "generate"


def route_after_generate(state: ClvrState) -> Literal["verify", "stop"]:
    return "stop" if state.get("status") == "failed" else "verify"


def route_after_verify(
    state: ClvrState, runtime: Runtime[ClvrContext]
) -> Literal["generate", "correct", "stop"]:
    if state.get("status") == "failed":
        return "stop"
    if not state["steps"][-1].accepted:
        return "generate"  # passive retry: same instruction, new seed, same iteration
    return "stop" if stop_decision(state, _ctx(runtime)) else "correct"


def route_after_correct(state: ClvrState) -> Literal["generate", "stop"]:
    return "stop" if state.get("status") == "failed" else "generate"


# ---------------------------------------------------------------- builder


def build_graph(*, interactive: bool = False, backends: Optional[Backends] = None) -> StateGraph:
    """The uncompiled loop; ``interactive`` adds approval pauses after plan and before stop.

    ``backends`` resolves the context's backend names (the app passes :mod:`clvr_agent.tools.registry`);
    without it, every run must hand in its executor and controller objects."""

    def bind(runtime: Runtime) -> Runtime:
        """The node's runtime, its context (the schema's defaults if none came) resolving names via ``backends``."""
        ctx = _ctx(runtime)
        return runtime.override(context=ctx if backends is None else ctx.use_backends(backends))

    def node(fn: Callable) -> Callable:
        def run(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
            return fn(state, bind(runtime))

        run.__name__ = fn.__name__
        return run

    async def agenerate(state: ClvrState) -> dict:
        return await agenerate_canvas(state, bind(get_runtime(ClvrContext)))

    g = StateGraph(ClvrState, context_schema=ClvrContext, input_schema=ClvrInput, output_schema=ClvrOutput)
    g.add_node("plan", node(plan_prompt))
    g.add_node("generate", RunnableLambda(
        lambda state: generate_canvas(state, bind(get_runtime(ClvrContext))), afunc=agenerate, name="generate"))
    g.add_node("verify", node(verify_canvas))
    g.add_node("correct", node(correct_canvas))
    g.add_node("stop", node(stop_run))
    g.add_edge(START, "plan")
    if interactive:
        g.add_node("review_plan", review_plan)
        g.add_node("review_stop", review_stop)
        g.add_conditional_edges("plan", route_after_plan, {"generate": "review_plan", "stop": "review_stop"})
        g.add_edge("review_plan", "generate")
        g.add_edge("review_stop", "stop")
        stop_target = "review_stop"
    else:
        g.add_conditional_edges("plan", route_after_plan, {"generate": "generate", "stop": "stop"})
        stop_target = "stop"
    g.add_conditional_edges("generate", route_after_generate, {"verify": "verify", "stop": stop_target})
    g.add_conditional_edges(
        "verify", route_after_verify, {"generate": "generate", "correct": "correct", "stop": stop_target}
    )
    g.add_conditional_edges("correct", route_after_correct, {"generate": "generate", "stop": stop_target})
    g.add_edge("stop", END)
    return g
