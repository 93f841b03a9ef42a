"""``clvr synth`` (verified trajectory synthesis) and ``clvr train sft-vlm`` (controller SFT on its output).

Nothing heavy is imported until a command runs. Bad input is one line on stderr and exit code 2.
Multi-GPU SFT: ``accelerate launch -m clvr_agent.cli train sft-vlm …`` with the same flags; synthesis
scales out with ``--shard K/N`` (one process per shard, same ``--out``), then ``--merge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise _fail(f"--shard {text!r}: expected K/N, e.g. 0/4 for the first of four shards") from None
    if not 0 <= k < n:
        raise _fail(f"--shard {text!r}: need 0 <= K < N, e.g. 0/4 for the first of four shards")
    return k, n


def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder (resumed when it exists)."),
    n: int = typer.Option(100, "--n", help="Prompts in the whole run (all shards together)."),
    seed: int = typer.Option(0, help="Seeds the prompt generator and every loop run."),
    shard: str = typer.Option("0/1", help="K/N: run prompts i with i % N == K."),
    backend: str = typer.Option("shapeworld", help="Executor: shapeworld, flux2-klein, clvr-mini."),
    controller: str = typer.Option("shapeworld", help="Controller: shapeworld, qwen3-vl."),
    prompts: str = typer.Option("tiers", help="tiers | geneval (ShapeWorld generators) or a .txt/.jsonl file."),
    max_tier: int = typer.Option(8, help="--prompts tiers: prompt i has 1 + i % max_tier constraints."),
    max_iterations: int = typer.Option(8, help="Loop budget per prompt."),
    model: Optional[str] = typer.Option(None, help="Executor weights (flux2-klein / clvr-mini)."),
    vlm: Optional[str] = typer.Option(None, help="Qwen3-VL weights for --controller qwen3-vl."),
    dtype: str = typer.Option("bfloat16", help="torch dtype for real models."),
    device: str = typer.Option("cuda", help="torch device for real models."),
    merge: bool = typer.Option(False, help="Afterwards, merge every shard in --out into data.jsonl."),
    record_calls: bool = typer.Option(False, help="Also write every controller call and answer (calls-*.jsonl) for VLM SFT."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run the loop on generated prompts and keep the verified trajectories that beat a single-step draw."""
    from clvr_agent.cli_common import controller_options, executor_options
    from clvr_agent.tools.registry import controller_names, executor_names, get_controller, get_executor
    from clvr_agent.training.synth import SynthConfig, merge_shards, synthesize

    if backend not in executor_names():
        raise _fail(f"unknown backend {backend!r}; known: {', '.join(executor_names())}")
    if controller not in controller_names():
        raise _fail(f"unknown controller {controller!r}; known: {', '.join(controller_names())}")
    try:
        config = SynthConfig(out=str(out), n=n, seed=seed, prompts=prompts, max_tier=max_tier,
                             shard=parse_shard(shard), max_iterations=max_iterations, progress=progress,
                             record_calls=record_calls)
        executor = get_executor(backend, **executor_options(backend, model, dtype, device, False))
        ctl = get_controller(controller, **controller_options(controller, vlm, None, None, dtype, device))
        report = synthesize(config, executor, ctl)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc).splitlines()[0]) from None
    rejected = ", ".join(f"{v} {k}" for k, v in sorted(report.rejected.items())) or "none"
    typer.echo(f"kept {report.kept} of {report.tried} tried ({report.skipped} already done); "
               f"rejected: {rejected}; passive misses dropped: {report.dropped_steps}")
    if merge:
        try:
            typer.echo(f"merged: {merge_shards(out)}")
        except ValueError as exc:
            raise _fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Add ``clvr synth``."""
    app.command("synth")(synth)


def register_train(train_app: typer.Typer) -> None:
    """Add ``clvr train sft-vlm`` (its flags come from ``SFTVLMConfig``, like every ``clvr train`` command)."""
    from clvr_agent.cli_train import register_sft_vlm

    register_sft_vlm(train_app)
