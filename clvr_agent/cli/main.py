"""The ``clvr`` command line. Results go to stdout (``--json``: one object); progress goes to stderr.

Bad input is a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from clvr_agent.cli.common import ModelChoice, err, fail, with_model_options

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CLVR: closed-loop verified reasoning for text-to-image.")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"clvr-agent {version('clvr-agent')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the installed version and exit.")) -> None:
    pass


@app.command()
@with_model_options
def generate(
    prompt: str = typer.Argument(..., help="What the image must show."),
    out: Path = typer.Option(Path("clvr-run"), "--out", "-o", help="Run folder."),
    max_iterations: int = typer.Option(8, help="Loop budget."),
    seed: int = typer.Option(0, help="Run seed: the same prompt and seed draw the same images."),
    reference_window: int = typer.Option(3, help="Recent canvases the executor sees."),
    reference: list[Path] = typer.Option([], "--reference", "-r", help="Starting image(s) to edit instead of drawing afresh."),
    executor_option: list[str] = typer.Option(
        [], "--executor-option", metavar="KEY=VALUE",
        help="Extra executor option (JSON value), e.g. latency_s=0.5 for the ShapeWorld simulation."),
    checkpointer: Optional[str] = typer.Option(
        None, help="Where checkpoints live: a postgresql:// URL (default: checkpoints.sqlite in --out)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace the clvr run in --out (any other folder is refused)."),
    interactive: bool = typer.Option(False, help="Approve the plan, and the stop, at the terminal."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    *,
    models: ModelChoice,
) -> None:
    """Run the closed loop on PROMPT and write final.png, trajectory.json and trace.html to --out.

    A killed run continues with --resume, or with the same command again."""
    from clvr_agent.state import ClvrInput, Settings, input_error, validate_prompt

    settings = dict(max_iterations=max_iterations, seed=seed, reference_window=reference_window,
                    interactive=interactive, **models.request)
    try:
        cfg = Settings(**settings)
        prompt = validate_prompt(prompt, cfg.max_prompt_chars)
        refs = [str(p.resolve()) for p in reference]
        inputs = ClvrInput(prompt=prompt, seed=seed, max_iterations=max_iterations, references=refs).model_dump()
    except ValidationError as exc:
        fail(input_error(exc))
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    ex_opts = {**models.executor_options, **_key_values(executor_option)}
    _run_loop(out, models.backend, models.controller, ex_opts, models.controller_options, settings, inputs,
              checkpointer, resume, overwrite, interactive, as_json)


def _key_values(items: list[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--executor-option {item!r}: expected KEY=VALUE")
        try:
            opts[key] = json.loads(raw)
        except ValueError:
            opts[key] = raw
    return opts


def _run_loop(out, backend, controller, ex_opts, ctl_opts, settings, inputs, checkpointer, resume, overwrite,
              interactive, as_json):
    from clvr_agent.app.api import build_context, create_clvr
    from clvr_agent.app.runs import (
        RunFolderError, checkpointer_kind, describe_os_error, final_state, locked, open_checkpointer,
        prepare_out_dir, stream_run,
    )
    from clvr_agent.store import ArtifactStore
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError

    try:  # models first: a backend that cannot load leaves --out as empty as it found it
        ctx = build_context(backend, controller=controller, executor_options=ex_opts, controller_options=ctl_opts,
                            **settings)
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    status = None
    try:
        kind = checkpointer_kind(checkpointer)
        with locked(out):
            manifest = prepare_out_dir(out, inputs=inputs, resume=resume, overwrite=overwrite, checkpointer=kind)
            ctx.use_store(ArtifactStore(out / "steps", base=out))  # refs relative to --out: the folder can move
            runnable = create_clvr(checkpointer=open_checkpointer(out, checkpointer), context=ctx)
            with _terminate_as_interrupt(), err.status("planning…") as status:
                for mode, chunk in stream_run(runnable, out, manifest["inputs"], thread_id=manifest["thread_id"],
                                              on_interrupt=_ask if interactive else None):
                    if mode == "custom":
                        status.update(_describe(chunk))
            values = final_state(runnable, manifest["thread_id"])
    except RunFolderError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{describe_os_error(exc)}; the finished steps are kept: fix it and run the same command again")
    except sqlite3.Error as exc:  # the checkpoint file on a full or read-only disk
        fail(f"checkpoint database: {exc}; the finished steps are kept: fix it and run the same command again")
    except KeyboardInterrupt as exc:
        err.print(f"interrupted: the run is saved in {out}; run the same command again (or --resume) to continue")
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130)
    result = {"status": values.get("status"), "final_image": str(out / "final.png") if values.get("final_image") else None,
              "iterations": values.get("iterations"), "stop_reason": values.get("stop_reason"),
              "trajectory": str(out / "trajectory.json"), "trace": str(out / "trace.html")}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        typer.echo(f"{result['status']}: {result['stop_reason']} after {result['iterations']} iteration(s)")
        typer.echo(f"final image: {result['final_image']}\ntrace: {result['trace']}")
    if result["status"] == "failed":
        raise typer.Exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as Ctrl-C is."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler or `kill`) ends the run as Ctrl-C does: outputs written, resumable."""
    def raise_interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _describe(event: dict) -> str:
    kind = event.get("event")
    if kind == "denoise":
        return f"step {event['step']}: denoising {event['i']}/{event['of']}"  # executors count from 1
    if kind == "iteration":
        return f"iteration {event['iteration']}: score {event['score']:.2f}"
    if kind == "node_start":
        return f"{event['node']}…"
    return str(kind)


def _ask(value: dict):
    """Answer an interrupt at the terminal (stderr prompts so stdout stays clean)."""
    if value.get("kind") == "approve_plan":
        err.print("[bold]Plan:[/]")
        for c in value["plan"]["constraints"]:
            err.print(f"  - {c['text']}")
        err.print(f"first instruction: {value['plan']['first_instruction']}")
        if typer.confirm("Approve the plan?", default=True, err=True):
            return True
        plan = dict(value["plan"])
        plan["first_instruction"] = typer.prompt("First instruction", err=True)
        return plan
    typer.confirm(f"Stop after {value.get('iterations')} iteration(s)?", default=True, err=True)
    return True


@app.command()
def trace(run_dir: Path = typer.Argument(..., help="A run folder written by `clvr generate`.")) -> None:
    """Re-render RUN_DIR/trace.html and print a short summary."""
    from clvr_agent.app.trace import render_trace, summary_text
    from clvr_agent.types import Trajectory

    path = run_dir / "trajectory.json"
    if not path.is_file():
        fail(f"no trajectory.json in {run_dir}")
    try:
        traj = Trajectory.model_validate_json(path.read_text())
    except ValueError as exc:
        fail(f"{path} is not a valid trajectory: {str(exc).splitlines()[0]}")
    render_trace(traj, run_dir / "trace.html")
    typer.echo(summary_text(traj))
    typer.echo(f"trace: {run_dir / 'trace.html'}")


@app.command()
def schema() -> None:
    """Print the trajectory record's versioned JSON schema."""
    from clvr_agent.types import trajectory_json_schema

    typer.echo(json.dumps(trajectory_json_schema(), indent=2))


@app.command()
def merge(
    base: Path = typer.Option(..., help="Base weights: .safetensors, sharded folder, or diffusers model folder."),
    aligned: Path = typer.Option(..., help="Aligned (SFT+PPRL) weights or a LoRA adapter folder."),
    distilled: Path = typer.Option(..., help="4-step distilled weights or a LoRA adapter folder."),
    out: Path = typer.Option(..., "--out", "-o"),
    lambda_align: float = typer.Option(1.0, help="Weight of the alignment delta."),
    lambda_distill: float = typer.Option(1.0, help="Weight of the distillation delta."),
    method: str = typer.Option("sum", help="sum | ties | dare"),
    ties_density: float = typer.Option(0.2), dare_drop: float = typer.Option(0.5), seed: int = typer.Option(0),
    max_shard_mb: float = typer.Option(2048.0),
) -> None:
    """Δ-space weight merge: W = W_base + λa·(W_aligned − W_base) + λd·(W_distilled − W_base), streamed."""
    from clvr_agent.training.merge import MergeConfig, merge_checkpoints

    try:
        config = MergeConfig(base=base, aligned=aligned, distilled=distilled, out=out, lambda_align=lambda_align,
                             lambda_distill=lambda_distill, method=method, ties_density=ties_density,
                             dare_drop=dare_drop, seed=seed, max_shard_mb=max_shard_mb)
        report = merge_checkpoints(config)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    typer.echo(json.dumps({"out": str(out), **report["summary"]}, indent=2, default=str))


def _mount_subcommands() -> None:
    """Sub-apps live beside their code: eval/probe, bench, train, synth, mcp."""
    from clvr_agent.cli import bench as cli_bench, data as cli_data, eval as cli_eval, mcp as cli_mcp
    from clvr_agent.cli import train as cli_train

    app.add_typer(cli_eval.eval_app, name="eval")
    app.add_typer(cli_bench.bench_app, name="bench")
    app.add_typer(cli_train.train_app, name="train")
    cli_eval.register(app)
    cli_data.register(app)
    cli_data.register_train(cli_train.train_app)
    cli_mcp.register(app)


_mount_subcommands()


def main() -> None:
    app()

