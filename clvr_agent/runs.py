"""A run in a folder: durable (SQLite checkpoints), resumable, and always leaving its artifacts.

Layout: ``DIR/steps/<sha256>.png`` (every canvas), ``DIR/final.png``, ``DIR/trajectory.json``,
``DIR/trace.html`` and ``DIR/checkpoints.sqlite``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from clvr_agent.trace import render_trace
from clvr_agent.types import Trajectory

THREAD_ID = "clvr"
CHECKPOINTS = "checkpoints.sqlite"


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a non-empty folder unless told to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    nonempty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / CHECKPOINTS).is_file():
            raise ValueError(f"nothing to resume in {out}: no {CHECKPOINTS}")
        return
    if nonempty and not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --resume to continue that run or --overwrite to replace it")
    if nonempty and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def open_checkpointer(out: Path):
    from langgraph.checkpoint.sqlite import SqliteSaver

    from clvr_agent.state import checkpoint_serde

    conn = sqlite3.connect(str(out / CHECKPOINTS), check_same_thread=False)
    return SqliteSaver(conn, serde=checkpoint_serde())


def trajectory_from_state(values: dict, *, backend: str = "", controller: str = "") -> Trajectory:
    """The trajectory of a finished run, or of an interrupted one rebuilt from its checkpoint."""
    if values.get("trajectory"):
        return Trajectory.model_validate(values["trajectory"])
    steps = values.get("steps", [])
    done = [s for s in steps if s.accepted and s.canvas is not None]
    return Trajectory(
        prompt=values.get("prompt", ""), seed=values.get("seed", 0), backend=backend, controller=controller,
        plan=values.get("plan"), steps=steps, status=values.get("status", "running"),
        stop_reason=values.get("stop_reason", "interrupted"), iterations=values.get("iteration", 0),
        final_image=done[-1].canvas if done else None,
    )


def write_outputs(out: Path, trajectory: Trajectory) -> None:
    """trajectory.json, final.png and trace.html: written whatever state the run is in."""
    tmp = out / "trajectory.json.tmp"
    tmp.write_text(json.dumps(trajectory.model_dump(mode="json"), indent=2))
    tmp.replace(out / "trajectory.json")
    if trajectory.final_image is not None:
        shutil.copyfile(trajectory.final_image.path, out / "final.png")
    render_trace(trajectory, out / "trace.html")


def stream_run(
    runnable: Any,
    out: Path,
    inputs: Optional[dict],
    *,
    on_interrupt: Optional[Callable[[dict], Any]] = None,
) -> Iterator[tuple[str, Any]]:
    """Run (or resume, when ``inputs`` is None) and yield ``(mode, chunk)`` stream events.

    ``on_interrupt(value) -> resume value`` answers human-in-the-loop pauses. Whatever happens,
    the outputs are written from the latest checkpoint before this returns or raises.
    """
    from langgraph.types import Command

    cfg = {"configurable": {"thread_id": THREAD_ID}}
    ctx = runnable.clvr_context
    names = dict(backend=getattr(ctx.get_executor(), "name", ""), controller=getattr(ctx.get_controller(), "name", ""))
    try:
        payload: Any = inputs
        while True:
            pending = None
            for mode, chunk in runnable.stream(payload, cfg, stream_mode=["updates", "custom"]):
                if mode == "updates" and "__interrupt__" in chunk:
                    pending = chunk["__interrupt__"][0].value
                yield mode, chunk
            if pending is None or on_interrupt is None:
                break
            payload = Command(resume=on_interrupt(pending))
    finally:
        state = runnable.graph.get_state(cfg)
        if state.values:
            write_outputs(out, trajectory_from_state(state.values, **names))


def final_state(runnable: Any) -> dict:
    return runnable.graph.get_state({"configurable": {"thread_id": THREAD_ID}}).values
