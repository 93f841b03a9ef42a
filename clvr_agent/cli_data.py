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


def sft_vlm(
    data: Path = typer.Option(..., "--data", help="A `clvr synth` folder (or a trajectory .jsonl)."),
    model: str = typer.Option(..., "--model", help="Qwen3-VL to fine-tune: a local folder or a hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (model + checkpoints)."),
    lora: bool = typer.Option(False, "--lora/--full", help="LoRA on the language model, or a full fine-tune."),
    lora_rank: int = typer.Option(16, help="LoRA rank (with --lora)."),
    train_vision: bool = typer.Option(False, help="With --full: also train the vision tower (a model trained from scratch needs it)."),
    dialogue: str = typer.Option("calls", help="calls (one per controller call, as the controller sends it) | trajectory (multi-turn)."),
    max_steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Conversations per step per process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step."),
    learning_rate: float = typer.Option(1e-4, help="AdamW learning rate."),
    image_size: int = typer.Option(512, help="Longer side of each canvas before the processor."),
    max_length: int = typer.Option(32768, help="Longest conversation in tokens (longer is an error)."),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16."),
    dtype: str = typer.Option("float32", help="Weights dtype when loading (float32 keeps AdamW exact)."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N steps."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --out."),
) -> None:
    """Supervised fine-tuning of the Qwen3-VL controller on synthesized trajectories (assistant-only loss)."""
    from clvr_agent.training.sft_vlm import SFTVLMConfig, SFTVLMTrainer, TrajectoryDialogueDataset

    try:
        config = SFTVLMConfig(
            output_dir=str(out), dialogue=dialogue, max_steps=max_steps, batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, learning_rate=learning_rate,
            lora_rank=lora_rank if lora else 0, train_vision=train_vision, image_size=image_size, max_length=max_length,
            mixed_precision=mixed_precision, checkpoint_every=checkpoint_every, seed=seed, resume=resume,
        )
        dataset = TrajectoryDialogueDataset.from_path(data, dialogue=config.dialogue, image_size=config.image_size,
                                                      history_token_budget=config.history_token_budget,
                                                      history_images=config.history_images)
        from clvr_agent.tools.qwen3_vl import load_qwen3_vl

        vlm, processor = load_qwen3_vl(model, torch_dtype=dtype, device="cpu")  # accelerate places it
        history = SFTVLMTrainer(vlm, processor, config, dataset).train()
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(str(exc).splitlines()[0]) from None
    first, last = history[0] if history else None, history[-1] if history else None
    if first is not None:
        typer.echo(f"trained {len(dataset)} conversations; loss {first['loss']:.4f} -> {last['loss']:.4f} "
                   f"(steps {first['step']}..{last['step']}); model: {out}")
    else:
        typer.echo(f"nothing to do: already at max_steps; model: {out}")


def register(app: typer.Typer) -> None:
    """Add ``clvr synth``."""
    app.command("synth")(synth)


def register_train(train_app: typer.Typer) -> None:
    """Add ``clvr train sft-vlm``."""
    train_app.command("sft-vlm")(sft_vlm)
