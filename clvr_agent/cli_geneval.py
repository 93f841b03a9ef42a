"""``clvr eval geneval``: the official 553 prompts × N samples with any backend, scored on real images.

Torch and transformers are imported inside the commands only, so ``clvr --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

GENERATOR_BACKENDS = ("flux2-klein", "clvr-mini")


def _fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _device_and_dtype(device: Optional[str], dtype: Optional[str]) -> tuple[str, str]:
    """cuda when available, else cpu; bfloat16 on an accelerator and float32 on the CPU by default."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, dtype or ("float32" if device == "cpu" else "bfloat16")


def _check_model_args(detector_model: str, clip_model: str) -> None:
    """A path-like model argument must be an existing folder (checked before hours of generation)."""
    for flag, value in (("--detector-model", detector_model), ("--clip-model", clip_model)):
        looks_like_path = value.startswith(("/", ".", "~")) or value.count("/") != 1
        if looks_like_path and not Path(value).expanduser().is_dir():
            _fail(f"{flag} {value} is not a folder (pass a hub id owner/name or a save_pretrained folder)")


def score_mask2former(images: Path, out: Path, *, detector_model: str, clip_model: str,
                      device: Optional[str] = None) -> dict:
    """Score a GenEval-layout folder with Mask2Former + CLIP colour → OUT/results.jsonl, summary.json."""
    from clvr_agent.eval_geneval import mask2former_scorer, score_geneval

    device = _device_and_dtype(device, None)[0]
    _check_model_args(detector_model, clip_model)
    try:
        detect, colors_for = mask2former_scorer(detector_model, clip_model, device=device)
        return score_geneval(images, out, detect, colors_for)
    except (ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0])


def geneval_cmd(
    backend: str = typer.Option("flux2-klein", help="Executor: flux2-klein, clvr-mini, shapeworld, …"),
    model: Optional[str] = typer.Option(None, help="Executor weights: hub id or local diffusers folder."),
    mode: str = typer.Option("single", help="single (one executor call per sample) or loop (the CLVR graph)."),
    controller: Optional[str] = typer.Option(None, help="Loop mode: shapeworld or qwen3-vl (default: the backend's)."),
    vlm: Optional[str] = typer.Option(None, help="Loop mode with --controller qwen3-vl: its weights."),
    max_iterations: int = typer.Option(8, help="Loop mode: the loop budget."),
    detector: str = typer.Option("mask2former", help="mask2former (real images) or none (generate only)."),
    detector_model: Optional[str] = typer.Option(None, help="Mask2Former COCO-instance weights (hub id or folder)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP weights for colour (hub id or folder)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first LIMIT of the 553 prompts."),
    samples: int = typer.Option(4, min=1, help="Images per prompt."),
    shard: str = typer.Option("0/1", help="K/N: this job draws prompts i with i % N == K."),
    seed: int = typer.Option(0, help="Sample j of prompt i uses seed SEED + 1000 i + j."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default from the checkpoint)."),
    height: Optional[int] = typer.Option(None), width: Optional[int] = typer.Option(None),
    out: Path = typer.Option(Path("geneval"), "--out", "-o", help="GenEval-layout folder (resumed if it exists)."),
    dtype: Optional[str] = typer.Option(None, help="Generator dtype (default bfloat16 on GPU, float32 on CPU)."),
    device: Optional[str] = typer.Option(None, help="torch device (default cuda when available)."),
) -> None:
    """Generate the official GenEval prompts into OUT (resumable, shardable), then score every sample in OUT.

    A sharded job (N > 1) only generates. When every shard is done, run again without --shard: it finds every sample, draws nothing and scores the merged folder.
    """
    from clvr_agent.eval_geneval import (
        generate_geneval, loop_sampler, mask2former_scorer, parse_shard, score_geneval, single_step_sampler,
    )

    if mode not in ("single", "loop"):
        _fail(f"--mode {mode!r}: choose single or loop")
    if detector not in ("mask2former", "none"):
        _fail(f"--detector {detector!r}: choose mask2former or none (score ShapeWorld folders with `clvr eval score`)")
    if detector == "mask2former":
        if not detector_model or not clip_model:
            _fail("--detector mask2former needs --detector-model and --clip-model (hub ids or folders)")
        _check_model_args(detector_model, clip_model)
    if mode == "loop":
        from clvr_agent.api import DEFAULT_CONTROLLER

        controller = controller or DEFAULT_CONTROLLER.get(backend, "shapeworld")
        if controller not in ("shapeworld", "qwen3-vl"):
            _fail(f"--controller {controller!r}: choose shapeworld or qwen3-vl")
        if controller == "qwen3-vl" and not vlm:
            _fail("loop mode with the qwen3-vl controller needs --vlm (a hub id or a local folder)")
    if backend == "flux2-klein" and not model:
        _fail(f"--backend {backend} needs --model (a hub id or a local diffusers folder)")
    if model and backend not in GENERATOR_BACKENDS:
        _fail(f"--model is not used by --backend {backend}")
    if (height is None) != (width is None):
        _fail("give both --height and --width, or neither")
    try:
        k, n = parse_shard(shard)
    except ValueError as exc:
        _fail(str(exc))
    device, dtype = _device_and_dtype(device, dtype)
    ex_opts = {"model": model, "torch_dtype": dtype, "device": device} if backend in GENERATOR_BACKENDS else {}
    ex_opts = {key: v for key, v in ex_opts.items() if v is not None}
    request = {key: v for key, v in dict(steps=steps, height=height, width=width).items() if v is not None}

    def make_sampler():
        from clvr_agent.tools.registry import get_executor

        if mode == "single":
            return single_step_sampler(get_executor(backend, **ex_opts), **request)
        ctl_opts = {"vlm": vlm, "torch_dtype": dtype, "device": device} if controller == "qwen3-vl" else {}
        return loop_sampler(backend, controller=controller, executor_options=ex_opts, controller_options=ctl_opts,
                            max_iterations=max_iterations, **request)

    def progress(index: int, j: int) -> None:
        typer.echo(f"prompt {index:05d} sample {j:04d}", err=True)

    try:
        counts = generate_geneval(out, make_sampler, samples=samples, limit=limit, shard=(k, n), seed=seed,
                                  on_sample=progress)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc).splitlines()[0])
    report = {"out": str(out), "shard": f"{k}/{n}", **counts}
    if detector == "mask2former" and n == 1:
        try:
            detect, colors_for = mask2former_scorer(detector_model, clip_model, device=device)
        except (ValueError, OSError) as exc:
            _fail(str(exc).splitlines()[0])
        report["summary"] = score_geneval(out, out, detect, colors_for)
        report["results"] = str(out / "results.jsonl")
    typer.echo(json.dumps(report, indent=2))


def register(eval_app: typer.Typer) -> None:
    """Add ``geneval`` to the ``clvr eval`` sub-app."""
    eval_app.command("geneval")(geneval_cmd)
