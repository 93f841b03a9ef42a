"""The CLVR loop as a LangGraph ``StateGraph``: plan -> generate -> verify -> (correct -> generate)* -> stop.

Nodes are small functions of ``(state, runtime)`` returning partial updates. Models come from
``runtime.context`` (a :class:`~clvr_agent.state.ClvrContext`); the graph imports no concrete model.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from clvr_agent.state import ClvrContext, ClvrInput, ClvrOutput, ClvrState, validate_prompt
from clvr_agent.store import load_reference_image
from clvr_agent.tools.base import Cancelled, ControllerOutputError
from clvr_agent.types import Constraint, Correction, ExecutorRequest, Plan, Step, Trajectory

# ---------------------------------------------------------------- helpers


def _ctx(runtime: Runtime) -> ClvrContext:
    if runtime.context is None:
        from clvr_agent.api import default_context  # Studio / langgraph dev pass no context

        return default_context()
    return runtime.context


def _emit(event: dict) -> None:
    try:
        get_stream_writer()(event)
    except RuntimeError:  # called outside a runnable context (direct node tests)
        pass


def step_seed(seed: int, index: int) -> int:
    """Every executor call gets its own seed, fixed by the run seed and the step index (resume-safe)."""
    return (seed * 1_000_003 + index * 7919) % (2**31 - 1)


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
        return "satisfied", f"all constraints met at iteration {state['iteration']}"
    max_it = state.get("max_iterations") or ctx.settings.max_iterations
    if state["iteration"] >= max_it:
        return "budget_exhausted", f"{max_it} iterations used"
    patience = ctx.settings.patience
    scores = [s.verdict.score for s in accepted_canvases(steps) if s.verdict is not None]
    if len(scores) > patience and max(scores[-patience:]) <= max(scores[:-patience]):
        return "no_progress", f"no better score in the last {patience} iterations"
    return None


# ---------------------------------------------------------------- nodes


def plan_prompt(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    prompt = validate_prompt(state.get("prompt"), ctx.settings.max_prompt_chars)
    init_refs = [ctx.store.put(load_reference_image(p)) for p in state.get("references", [])]
    _emit({"event": "node_start", "node": "plan"})
    try:
        plan = ctx.controller.plan(prompt)
    except ControllerOutputError as exc:
        # A broken controller degrades the loop to single-step generation, never to nothing.
        plan = Plan(
            constraints=[Constraint(id="c0", text=prompt, kind="other")],
            first_instruction=prompt,
            reasoning=f"controller failed to plan: {exc}",
            fallback=True,
        )
    _emit({"event": "node_end", "node": "plan", "constraints": len(plan.constraints)})
    return {
        "prompt": prompt,
        "seed": state.get("seed", ctx.settings.seed),
        "max_iterations": state.get("max_iterations") or ctx.settings.max_iterations,
        "plan": plan,
        "init_references": init_refs,
        "pending": Correction(instruction=plan.first_instruction, mode="edit" if init_refs else "regenerate",
                              reasoning=plan.reasoning),
        "iteration": 1,
        "attempt": 0,
        "status": "running",
    }


def review_plan(state: ClvrState) -> dict:
    """Human in the loop: resume with True to approve, or a plan dict to replace it."""
    answer = interrupt({"kind": "approve_plan", "plan": state["plan"].model_dump(mode="json")})
    if isinstance(answer, dict):
        plan = Plan.model_validate(answer)
        return {"plan": plan, "pending": Correction(instruction=plan.first_instruction, mode="regenerate")}
    return {}


def build_request(state: ClvrState, ctx: ClvrContext) -> ExecutorRequest:
    """Trajectory-accumulative conditioning: all instructions so far and the last K canvases."""
    steps = state.get("steps", [])
    pending = state["pending"]
    history = accepted_canvases(steps)
    canvases = list(state.get("init_references", [])) + [s.canvas for s in history]
    mode = "generate" if pending.mode == "regenerate" or not canvases else pending.mode
    k = ctx.settings.reference_window
    refs = canvases[-k:] if mode != "generate" and k else []
    instructions = [s.instruction for s in history] + [pending.instruction]
    accumulated = "\n".join([state["prompt"], *[i for i in instructions if i != state["prompt"]]])
    s = ctx.settings
    return ExecutorRequest(
        mode=mode, instruction=pending.instruction, accumulated_prompt=accumulated,
        references=refs, seed=step_seed(state["seed"], len(steps)), steps=s.steps,
        guidance=s.guidance, height=s.height, width=s.width, region=pending.region,
        region_prompt=pending.region_prompt,
    )


def generate_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    request = build_request(state, ctx)
    index, pending = len(state.get("steps", [])), state["pending"]
    _emit({"event": "node_start", "node": "generate", "step": index, "mode": request.mode})

    def progress(i: int, total: int) -> bool:
        _emit({"event": "denoise", "step": index, "i": i, "of": total})
        return ctx.cancel.is_set()

    step = Step(index=index, iteration=state["iteration"], attempt=state.get("attempt", 0),
                instruction=pending.instruction, reasoning=pending.reasoning, request=request)
    refs = [r.open() for r in request.references]
    error = None
    for _ in range(ctx.settings.executor_retries + 1):
        t0 = time.perf_counter()
        try:
            out = ctx.executor.generate(request, refs, progress)
            break
        except Cancelled:
            error = "cancelled"
            break
        except Exception as exc:  # the executor's failure is recorded, then the run stops cleanly
            error = f"{type(exc).__name__}: {exc}"
        finally:
            ctx.model_seconds.append(time.perf_counter() - t0)
    if error is not None:
        step = step.model_copy(update={"error": error, "accepted": False})
        return {"steps": [step], "status": "failed", "stop_reason": f"executor failed: {error}"}
    t1 = time.perf_counter()
    canvas = ctx.store.put(out.image)
    step = step.model_copy(update={"canvas": canvas, "nfe": out.nfe, "timings": {
        "generate_s": out.seconds or ctx.model_seconds[-1], "store_s": time.perf_counter() - t1}})
    _emit({"event": "node_end", "node": "generate", "step": index, "nfe": out.nfe})
    return {"steps": [step]}


def verify_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    steps = state["steps"]
    step, attempt = steps[-1], state.get("attempt", 0)
    _emit({"event": "node_start", "node": "verify", "step": step.index})
    prior = accepted_canvases(steps[:-1])
    before = step.request.references[-1].open() if step.request.mode != "generate" and step.request.references else None
    after = step.canvas.open()
    t0 = time.perf_counter()
    try:
        passive = ctx.controller.check_step(step.instruction, before, after)
        if not passive.executed and attempt < ctx.settings.passive_retries:
            ctx.model_seconds.append(time.perf_counter() - t0)
            rejected = step.model_copy(update={"passive": passive, "accepted": False})
            return {"steps": [rejected], "attempt": attempt + 1}
        verdict = ctx.controller.verify(state["prompt"], state["plan"], after, prior)
    except ControllerOutputError as exc:
        return {"status": "failed", "stop_reason": f"controller could not verify: {exc}",
                "steps": [step.model_copy(update={"error": str(exc)})]}
    finally:
        ctx.model_seconds.append(time.perf_counter() - t0)
    timings = {**step.timings, "verify_s": time.perf_counter() - t0}
    step = step.model_copy(update={"passive": passive, "verdict": verdict, "timings": timings})
    _emit({"event": "iteration", "iteration": state["iteration"], "score": verdict.score,
           "satisfied": verdict.satisfied, "unmet": [c.id for c in verdict.unmet()]})
    return {"steps": [step], "attempt": 0}


def correct_canvas(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    steps = state["steps"]
    last = accepted_canvases(steps)[-1]
    _emit({"event": "node_start", "node": "correct", "iteration": state["iteration"]})
    t0 = time.perf_counter()
    try:
        correction = ctx.controller.correct(state["prompt"], state["plan"], last.verdict, last.canvas.open(), steps)
    except ControllerOutputError as exc:
        return {"status": "failed", "stop_reason": f"controller could not correct: {exc}"}
    finally:
        ctx.model_seconds.append(time.perf_counter() - t0)
    _emit({"event": "node_end", "node": "correct", "instruction": correction.instruction, "mode": correction.mode})
    return {"pending": correction, "iteration": state["iteration"] + 1, "attempt": 0}


def review_stop(state: ClvrState) -> dict:
    """Human in the loop: confirm before the run ends (resume with any value)."""
    interrupt({"kind": "approve_stop", "iterations": state.get("iteration", 0)})
    return {}


def stop_run(state: ClvrState, runtime: Runtime[ClvrContext]) -> dict:
    ctx = _ctx(runtime)
    decision = stop_decision(state, ctx) or ("failed", "stopped without a verdict")
    status, reason = decision
    steps = state.get("steps", [])
    best = best_step(steps)
    final = best.canvas if best else None
    trajectory = Trajectory(
        prompt=state.get("prompt", ""), seed=state.get("seed", ctx.settings.seed),
        backend=getattr(ctx.executor, "name", ""), controller=getattr(ctx.controller, "name", ""),
        plan=state.get("plan"), steps=steps, status=status, stop_reason=reason,
        final_image=final, iterations=state.get("iteration", 0),
    )
    _emit({"event": "stop", "status": status, "reason": reason})
    return {"status": status, "stop_reason": reason, "final_image": final.path if final else None,
            "iterations": state.get("iteration", 0), "trajectory": trajectory.model_dump(mode="json")}


# ---------------------------------------------------------------- routers


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


def build_graph(*, interactive: bool = False) -> StateGraph:
    """The uncompiled loop; ``interactive`` adds approval pauses after plan and before stop."""
    g = StateGraph(ClvrState, context_schema=ClvrContext, input_schema=ClvrInput, output_schema=ClvrOutput)
    g.add_node("plan", plan_prompt)
    g.add_node("generate", generate_canvas)
    g.add_node("verify", verify_canvas)
    g.add_node("correct", correct_canvas)
    g.add_node("stop", stop_run)
    g.add_edge(START, "plan")
    if interactive:
        g.add_node("review_plan", review_plan)
        g.add_node("review_stop", review_stop)
        g.add_edge("plan", "review_plan")
        g.add_edge("review_plan", "generate")
        g.add_edge("review_stop", "stop")
        stop_target = "review_stop"
    else:
        g.add_edge("plan", "generate")
        stop_target = "stop"
    g.add_conditional_edges("generate", route_after_generate, {"verify": "verify", "stop": stop_target})
    g.add_conditional_edges(
        "verify", route_after_verify, {"generate": "generate", "correct": "correct", "stop": stop_target}
    )
    g.add_conditional_edges("correct", route_after_correct, {"generate": "generate", "stop": stop_target})
    g.add_edge("stop", END)
    return g
