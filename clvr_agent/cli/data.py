"""``clvr synth`` (verified trajectory synthesis) and ``clvr train sft-vlm`` (controller SFT on its output).

Nothing heavy is imported until a command runs. Bad input is one line on stderr and exit code 2.
Multi-GPU SFT: ``accelerate launch -m clvr_agent.cli train sft-vlm …`` with the same flags; synthesis
scales out with ``--shard K/N`` (one process per shard, same ``--out``), then ``--merge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clvr_agent.cli.common import fail, model_choice, parse_shard


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
    dtype: str = typer.Option("auto", help="torch dtype for real models: auto (bfloat16 on CUDA, float32 on CPU)."),
    device: str = typer.Option("auto", help="torch device for real models: auto (cuda when available, else cpu)."),
    merge: bool = typer.Option(False, help="Afterwards, merge every shard in --out into data.jsonl."),
    record_calls: bool = typer.Option(False, help="Also write every controller call and answer (calls-*.jsonl) for VLM SFT."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run the loop on generated prompts and keep the verified trajectories that beat a single-step draw."""
    from clvr_agent.tools.registry import get_controller, get_executor
    from clvr_agent.training.synth import SynthConfig, merge_shards, synthesize

    models = model_choice(backend=backend, controller=controller, model=model, vlm=vlm, dtype=dtype, device=device)
    try:
        config = SynthConfig(out=str(out), n=n, seed=seed, prompts=prompts, max_tier=max_tier,
                             shard=parse_shard(shard), max_iterations=max_iterations, progress=progress,
                             record_calls=record_calls)
        executor = get_executor(backend, **models.executor_options)
        ctl = get_controller(controller, **models.controller_options)
        report = synthesize(config, executor, ctl)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0])
    rejected = ", ".join(f"{v} {k}" for k, v in sorted(report.rejected.items())) or "none"
    typer.echo(f"kept {report.kept} of {report.tried} tried ({report.skipped} already done); "
               f"rejected: {rejected}; passive misses dropped: {report.dropped_steps}")
    if merge:
        try:
            typer.echo(f"merged: {merge_shards(out)}")
        except ValueError as exc:
            fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add ``clvr synth``."""
    app.command("synth")(synth)


def register_train(train_app: typer.Typer) -> None:
    """Add ``clvr train sft-vlm`` (its flags come from ``SFTVLMConfig``, like every ``clvr train`` command)."""
    from clvr_agent.cli.train import register_sft_vlm

    register_sft_vlm(train_app)
