"""A run in a folder: durable, resumable, exclusive, relocatable, and always leaving its artifacts.

Layout: ``DIR/run.json`` (the run's inputs and thread id, written before anything else),
``DIR/steps/<sha256>.png`` (every canvas, content-addressed), ``DIR/final.png``,
``DIR/trajectory.json``, ``DIR/trace.html`` and ``DIR/checkpoints.sqlite`` (unless the checkpoints
live in PostgreSQL). Every path recorded inside is relative to ``DIR``, so the folder can move.
Every output is written to a temp file in ``DIR`` and renamed, so no reader ever sees half a file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from clvr_agent.app.trace import write_trace
from clvr_agent.types import IMAGE_ROOT, Trajectory

MANIFEST = "run.json"
CHECKPOINTS = "checkpoints.sqlite"
LOCK = ".clvr.lock"
LEGACY_THREAD_ID = "clvr"  # run folders written before run.json existed
# What a run folder holds; --overwrite removes these and nothing else.
OWNED = (MANIFEST, CHECKPOINTS, f"{CHECKPOINTS}-wal", f"{CHECKPOINTS}-shm", f"{CHECKPOINTS}-journal",
         "steps", "final.png", "trajectory.json", "trace.html")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to pass instead."""


# ---------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename; the temp file
    is removed on any failure (a full disk included), and a symlink at ``path`` is replaced, never
    followed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the folder


def read_manifest(out: Path) -> Optional[dict]:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RunFolderError(f"{path} is not valid JSON; the run folder is damaged") from None


def is_run_folder(out: Path) -> bool:
    return any((out / name).exists() for name in (MANIFEST, CHECKPOINTS, "trajectory.json"))


def _refuse_symlinks(out: Path) -> None:
    for name in OWNED:
        if (out / name).is_symlink():
            raise RunFolderError(f"{out / name} is a symlink; clvr never writes through links out of --out")


def prepare_out_dir(out: Path, *, inputs: dict, resume: bool, overwrite: bool,
                    checkpointer: str = "sqlite") -> dict:
    """Make ``out`` ready and return its manifest (a new one, or the stored run's).

    A folder holding the same prompt and seed is continued (``--resume`` or a plain re-run); one
    holding another run is refused unless ``overwrite``; ``overwrite`` replaces only a clvr run.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunFolderError(f"--out {out} is not a folder")
    nonempty = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
    if nonempty and not is_run_folder(out):
        raise RunFolderError(f"--out {out} is not empty and is not a clvr run folder; choose another folder")
    if nonempty:
        _refuse_symlinks(out)
    stored = read_manifest(out) if nonempty else None
    if nonempty and overwrite:
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        stored, nonempty = None, False
    if stored is None and nonempty:  # written before run.json: only an explicit --resume continues it
        if not resume:
            raise RunFolderError(f"--out {out} holds an earlier run; pass --resume to continue it or --overwrite")
        if not (out / CHECKPOINTS).is_file():
            raise RunFolderError(f"nothing to resume in {out}: no {CHECKPOINTS}")
        return {"thread_id": LEGACY_THREAD_ID, "inputs": inputs, "checkpointer": "sqlite"}
    if stored is not None:
        theirs = stored.get("inputs", {})
        for key in ("prompt", "seed"):
            if theirs.get(key) != inputs.get(key):
                hint = "" if resume else "; pass --overwrite to replace it"
                raise RunFolderError(f"--out {out} holds a run with {key} {theirs.get(key)!r}, not "
                                     f"{inputs.get(key)!r}{hint}")
        if stored.get("checkpointer", "sqlite") != checkpointer:
            raise RunFolderError(f"this run's checkpoints are in {stored.get('checkpointer')}; "
                                 f"pass the same --checkpointer to continue it")
        return stored
    if resume:
        raise RunFolderError(f"nothing to resume in {out}: it holds no clvr run")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"clvr_run": 1, "thread_id": str(uuid.uuid4()), "inputs": inputs, "checkpointer": checkpointer}
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder for the life of the process's run: a second
    process on the same folder gets RunFolderError naming the holder's PID."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderError(f"--out {out} is in use by another clvr process (PID {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if created and [p.name for p in out.iterdir()] == [LOCK]:  # refused before anything was written
            (out / LOCK).unlink(missing_ok=True)
            out.rmdir()
        os.close(fd)  # releases the lock; a kept lock file is harmless (removing it would race a waiter)


# ---------------------------------------------------------------- checkpoints


def open_checkpointer(out: Path, url: Optional[str] = None):
    """The run's checkpointer: SQLite in the run folder, or PostgreSQL at ``url``."""
    from clvr_agent.state import checkpoint_serde

    if url:
        return open_postgres(url)
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(str(out / CHECKPOINTS), check_same_thread=False)
    # WAL + synchronous=NORMAL: a killed process loses no committed checkpoint, at a fraction of
    # the fsyncs of the default rollback journal (only an OS crash can lose the newest one).
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return SqliteSaver(conn, serde=checkpoint_serde())


def checkpointer_kind(url: Optional[str]) -> str:
    if not url:
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgres"
    raise RunFolderError(f"--checkpointer must be a postgresql:// URL (default: SQLite in --out), got {url!r}")


def open_postgres(url: str):
    """A ``PostgresSaver`` on its own connection, with its tables created if missing."""
    try:
        import psycopg
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg.rows import dict_row
    except ModuleNotFoundError as exc:
        raise RunFolderError(f"--checkpointer postgresql:// needs {exc.name!r}: pip install 'clvr-agent[postgres]'") from None
    from clvr_agent.state import checkpoint_serde

    try:
        conn = psycopg.connect(url, autocommit=True, prepare_threshold=0, row_factory=dict_row)
    except psycopg.OperationalError as exc:
        raise RunFolderError(f"cannot connect to the checkpointer database: {str(exc).strip().splitlines()[0]}") from None
    saver = PostgresSaver(conn, serde=checkpoint_serde())
    saver.setup()
    return saver


# ---------------------------------------------------------------- outputs


def trajectory_from_state(values: dict, *, backend: str = "", controller: str = "") -> Trajectory:
    """The trajectory of a finished run, or of an interrupted one rebuilt from its checkpoint."""
    if values.get("trajectory"):
        return Trajectory.model_validate(values["trajectory"])
    steps = values.get("steps", [])
    done = [s for s in steps if s.accepted and s.canvas is not None]
    return Trajectory(
        prompt=values.get("prompt", ""), seed=values.get("seed") or 0, backend=backend, controller=controller,
        plan=values.get("plan"), steps=steps, status=values.get("status", "running"),
        stop_reason=values.get("stop_reason", "interrupted"), iterations=values.get("iterations", 0),
        final_canvas=done[-1].canvas if done else None, model_calls=values.get("model_calls", []),
    )


def write_outputs(out: Path, trajectory: Trajectory) -> None:
    """trajectory.json, final.png and trace.html, each atomically: written whatever state the run is in."""
    atomic_write(out / "trajectory.json", json.dumps(trajectory.model_dump(mode="json"), indent=2).encode())
    if trajectory.final_canvas is not None:
        atomic_write(out / "final.png", Path(trajectory.final_canvas.resolved(str(out.resolve()))).read_bytes())
    write_trace(trajectory, out / "trace.html")


def stream_run(
    runnable: Any,
    out: Path,
    inputs: Optional[dict],
    *,
    thread_id: str = LEGACY_THREAD_ID,
    on_interrupt: Optional[Callable[[dict], Any]] = None,
) -> Iterator[tuple[str, Any]]:
    """Run, or continue the run of ``thread_id``, and yield ``(mode, chunk)`` stream events.

    ``inputs`` start the run when its checkpoint holds nothing yet (a crash before the first
    checkpoint leaves exactly that); otherwise the run continues from its last checkpoint. Every
    node's checkpoint is written before the next node starts (durability ``sync``), so no finished
    step is redone after a crash. ``trace.html`` is rewritten after every step; whatever happens,
    all outputs are written from the latest checkpoint before this returns or raises.
    """
    from langgraph.types import Command

    cfg = {"configurable": {"thread_id": thread_id}}
    ctx = runnable.clvr_context
    names = dict(backend=getattr(ctx.get_executor(), "name", ""), controller=getattr(ctx.get_controller(), "name", ""))
    IMAGE_ROOT.set(str(out.resolve()))
    try:
        payload: Any = None if runnable.graph.get_state(cfg).values else inputs
        while True:
            pending = None
            for mode, chunk in runnable.stream(payload, cfg, stream_mode=["updates", "custom"], durability="sync"):
                if mode == "updates" and "__interrupt__" in chunk:
                    pending = chunk["__interrupt__"][0].value
                if mode == "updates" and ("generate" in chunk or "verify" in chunk):
                    _write_progress(runnable, cfg, out, names)
                yield mode, chunk
            if pending is None or on_interrupt is None:
                break
            payload = Command(resume=on_interrupt(pending))
    finally:
        state = runnable.graph.get_state(cfg)
        if state.values:
            write_outputs(out, trajectory_from_state(state.values, **names))


def _write_progress(runnable: Any, cfg: dict, out: Path, names: dict) -> None:
    """The live trace page: rewritten after each step so a browser can follow a long run."""
    values = runnable.graph.get_state(cfg).values
    if values:
        write_trace(trajectory_from_state(values, **names), out / "trace.html")


def final_state(runnable: Any, thread_id: str = LEGACY_THREAD_ID) -> dict:
    return runnable.graph.get_state({"configurable": {"thread_id": thread_id}}).values


def describe_os_error(exc: OSError) -> str:
    """One line for a failed write: what, where, and that the run can be resumed."""
    what = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"{what}{where}"
