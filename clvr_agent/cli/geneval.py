"""``clvr eval geneval``: the official 553 prompts × N samples with any backend, scored on real images.

Torch and transformers are imported inside the commands only, so ``clvr --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clvr_agent.cli.common import check_model_source, fail, parse_shard, resolve_device, resolve_dtype

GENERATOR_BACKENDS = ("flux2-klein", "clvr-mini")


def _check_model_args(detector_model: str, clip_model: str) -> None:
    """A path-like model argument must be an existing folder (checked before hours of generation)."""
    check_model_source("--detector-model", detector_model)
    check_model_source("--clip-model", clip_model)


def score_mask2former(images: Path, out: Path, *, detector_model: str, clip_model: str,
                      device: str = "auto") -> dict:
    """Score a GenEval-layout folder with Mask2Former + CLIP colour → OUT/results.jsonl, summary.json."""
    from clvr_agent.eval.geneval import mask2former_scorer, score_folder

    device = resolve_device(device)
    _check_model_args(detector_model, clip_model)
    try:
        detect, colors_for = mask2former_scorer(detector_model, clip_model, device=device)
        return score_folder(images, out, detect, colors_for)
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])


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
    seed: int = typer.Option(0, help="Run seed: sample j of prompt i always gets the same derived seed."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default from the checkpoint)."),
    height: Optional[int] = typer.Option(None), width: Optional[int] = typer.Option(None),
    out: Path = typer.Option(Path("geneval"), "--out", "-o", help="GenEval-layout folder (resumed if it exists)."),
    dtype: str = typer.Option("auto", help="Generator dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32."),
    device: str = typer.Option("auto", help="torch device: auto (cuda when available, else cpu), cuda, cpu."),
) -> None:
    """Generate the official GenEval prompts into OUT (resumable, shardable), then score every sample in OUT.

    A sharded job (N > 1) only generates. When every shard is done, run again without --shard: it finds every sample, draws nothing and scores the merged folder.
    """
    from clvr_agent.eval.geneval import generate_geneval, mask2former_scorer, score_folder
    from clvr_agent.eval.sampling import loop, single_step
    from clvr_agent.tools.registry import default_controller

    if mode not in ("single", "loop"):
        fail(f"--mode {mode!r}: choose single or loop")
    if detector not in ("mask2former", "none"):
        fail(f"--detector {detector!r}: choose mask2former or none (score ShapeWorld folders with `clvr eval score`)")
    if detector == "mask2former":
        if not detector_model or not clip_model:
            fail("--detector mask2former needs --detector-model and --clip-model (hub ids or folders)")
        _check_model_args(detector_model, clip_model)
    if mode == "loop":
        controller = controller or default_controller(backend)
        if controller not in ("shapeworld", "qwen3-vl"):
            fail(f"--controller {controller!r}: choose shapeworld or qwen3-vl")
        if controller == "qwen3-vl" and not vlm:
            fail("loop mode with the qwen3-vl controller needs --vlm (a hub id or a local folder)")
    if backend == "flux2-klein" and not model:
        fail(f"--backend {backend} needs --model (a hub id or a local diffusers folder)")
    if model and backend not in GENERATOR_BACKENDS:
        fail(f"--model is not used by --backend {backend}")
    if (height is None) != (width is None):
        fail("give both --height and --width, or neither")
    k, n = parse_shard(shard)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ex_opts = {"model": model, "torch_dtype": dtype, "device": device} if backend in GENERATOR_BACKENDS else {}
    ex_opts = {key: v for key, v in ex_opts.items() if v is not None}
    request = {key: v for key, v in dict(steps=steps, height=height, width=width).items() if v is not None}

    def make_sampler():
        from clvr_agent.tools.registry import get_executor

        from clvr_agent.app.api import create_clvr

        if mode == "single":
            return single_step(get_executor(backend, **ex_opts), **request)
        ctl_opts = {"vlm": vlm, "torch_dtype": dtype, "device": device} if controller == "qwen3-vl" else {}
        return loop(create_clvr(backend, controller=controller, executor_options=ex_opts, controller_options=ctl_opts,
                                max_iterations=max_iterations, artifact_dir=str(out / "work"), **request))

    def progress(index: int, j: int) -> None:
        typer.echo(f"prompt {index:05d} sample {j:04d}", err=True)

    try:
        counts = generate_geneval(out, make_sampler, samples=samples, limit=limit, shard=(k, n), seed=seed,
                                  on_sample=progress)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0])
    report = {"out": str(out), "shard": f"{k}/{n}", **counts}
    if detector == "mask2former" and n == 1:
        try:
            detect, colors_for = mask2former_scorer(detector_model, clip_model, device=device)
        except (ValueError, OSError) as exc:
            fail(str(exc).splitlines()[0])
        report["summary"] = score_folder(out, out, detect, colors_for)
        report["results"] = str(out / "results.jsonl")
    typer.echo(json.dumps(report, indent=2))


def register(eval_app: typer.Typer) -> None:
    """Add ``geneval`` to the ``clvr eval`` sub-app."""
    eval_app.command("geneval")(geneval_cmd)
