"""``clvr eval …`` and ``clvr probe``: GenEval-style measurement on ShapeWorld and on real images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clvr_agent.cli.common import ModelChoice, fail, model_choice, shapeworld_controller_options, with_model_options

eval_app = typer.Typer(no_args_is_help=True, help="Measure the loop: ShapeWorld, any GenEval folder, real GenEval.")


def _out_ok(out: Path, overwrite: bool, resume: bool = False) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        fail(f"--out {out} is not empty; pass --overwrite to replace its results")


def _parse_tiers(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            tiers = list(range(lo, hi + 1))
        else:
            tiers = [int(x) for x in text.split(",")]
    except ValueError:
        fail(f"--tiers {text!r}: expected a range like 1-10 or a list like 1,5,10")
    if not tiers or min(tiers) < 1 or max(tiers) > 10:
        fail(f"--tiers {text!r}: tiers run from 1 to 10")
    return tiers


_REGION_HELP = ("The loop's ShapeWorld controller draws a missing object into a clear tile once edits fail "
                "(--no-region-draws: the loop must use the executor's own edits and redraws).")


@eval_app.command("shapeworld")
@with_model_options
def eval_shapeworld_cmd(
    mode: str = typer.Option("loop", help="single (one executor call) or loop (the CLVR graph)."),
    n: int = typer.Option(120, min=1, help="Prompts, spread over the six GenEval tags."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("eval-shapeworld"), "--out", "-o"),
    max_iterations: int = typer.Option(8),
    overwrite: bool = typer.Option(False),
    *,
    models: ModelChoice,
) -> None:
    """GenEval-style pass rate on ShapeWorld prompts → results.jsonl, summary.json, summary.png.

    The executor is any ShapeWorld drawer (shapeworld, clvr-mini with --model a trained folder, flux2-klein);
    the controller is the exact ShapeWorld one (`clvr eval controller` measures learned controllers)."""
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError
    from clvr_agent.eval.shapeworld import eval_shapeworld

    if mode not in ("single", "loop"):
        fail(f"--mode {mode!r}: choose single or loop")
    if models.controller not in (None, "shapeworld"):
        fail(f"--controller {models.controller}: this eval's loop is driven by the ShapeWorld controller; "
             "use `clvr eval controller` for other controllers")
    _out_ok(out, overwrite)
    request = {k: v for k, v in models.request.items() if v is not None}
    try:
        summary = eval_shapeworld(mode=mode, n=n, seed=seed, out_dir=out, backend=models.backend,
                                  max_iterations=max_iterations, executor_options=models.executor_options or None,
                                  controller_options=models.controller_options or None, request=request or None)
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo(json.dumps(summary, indent=2))


@eval_app.command("edits")
@with_model_options
def eval_edits_cmd(
    n: int = typer.Option(120, min=1, help="Edits to ask (prompts whose first canvas is right ask none and are skipped)."),
    seed: int = typer.Option(100, help="Prompt seed: the prompts and seeds of `clvr eval shapeworld --seed S`."),
    out: Path = typer.Option(Path("eval-edits"), "--out", "-o"),
    overwrite: bool = typer.Option(False),
    *,
    models: ModelChoice,
) -> None:
    """Edit success per op on the whole-canvas edits the loop asks for (ShapeWorld controller's correction
    of the executor's own canvas, passive check) → results.jsonl, summary.json, table.md."""
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError
    from clvr_agent.eval.edits import eval_edits
    from clvr_agent.state import ClvrContext
    from clvr_agent.tools.registry import get_executor

    if models.controller not in (None, "shapeworld"):
        fail(f"--controller {models.controller}: edits are asked and checked by the ShapeWorld controller; drop --controller")
    _out_ok(out, overwrite)
    try:
        executor = get_executor(models.backend, **models.executor_options)
        context = ClvrContext(**{k: v for k, v in models.request.items() if v is not None})
        label = f"{models.backend}" + (f" {models.executor_options['model']}" if "model" in models.executor_options else "")
        eval_edits(executor, n=n, seed=seed, out_dir=out, context=context, label=label)
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out / 'summary.json'} and {out / 'table.md'}")


def _parse_list(text: str, flag: str, kind: type = int) -> list:
    """A comma-separated CLI list of ints or floats; a clear error naming the flag otherwise."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        example = "1,2" if kind is int else "0.5,0.75,1,1.25"
        fail(f"{flag} {text!r}: expected a comma-separated list of {'integers' if kind is int else 'numbers'}, e.g. {example}")


@eval_app.command("table")
def eval_table_cmd(
    spec: Path = typer.Option(..., help="Rows as JSON: rows (name, model folder, steps, guidance, region_draws), "
                                        "compare (pairs from, to; default: each row against the one before), "
                                        "probe (row names); see clvr_agent/eval/table.py."),
    out: Path = typer.Option(Path("eval-table"), "--out", "-o", help="Rows already measured here are read back."),
    n: int = typer.Option(120, min=1, help="Prompts per seed (the same for every row)."),
    seeds: str = typer.Option("1,2", help="Evaluation seeds, comma-separated."),
    max_iterations: int = typer.Option(6),
    region_draws: bool = typer.Option(False, help="Region draws in every row's loop (a row's own region_draws wins)."),
    colour_shape_seeds: int = typer.Option(2, min=0, help="Seeds of single-object colour+shape (0 skips)."),
    edits: int = typer.Option(120, min=0, help="Edits asked per seed for edit success (0 skips)."),
    probe_tiers: str = typer.Option("1-6", help="Tiers of the probe curve of the spec's probe rows."),
    per_tier: int = typer.Option(5, min=1),
    device: str = typer.Option("auto", help="torch device of the klein rows: auto, cuda, cpu."),
    resamples: int = typer.Option(2000, min=100, help="Bootstrap resamples per interval."),
) -> None:
    """The results table: every row on the same prompts × seeds, bootstrap 95 % CIs for the spec's
    differences → table.json, table.md, table.png (+ probe.png); resumable per row and part."""
    from clvr_agent.cli.common import resolve_device
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError
    from clvr_agent.eval.table import Spec, TableConfig, build_table

    if not spec.is_file():
        fail(f"--spec {spec} is not a file")
    try:
        cfg = TableConfig(n=n, seeds=tuple(_parse_list(seeds, "--seeds")), max_iterations=max_iterations,
                          region_draws=region_draws, colour_shape_seeds=colour_shape_seeds, edits=edits,
                          probe_tiers=tuple(_parse_tiers(probe_tiers)), per_tier=per_tier,
                          device=resolve_device(device), resamples=resamples, progress=True)
        build_table(Spec.load(spec), out, cfg, log=lambda m: typer.echo(m, err=True))
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, OSError, ValueError, KeyError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out / 'table.json'}, {out / 'table.md'} and {out / 'table.png'}")


@eval_app.command("dswm-grid")
def eval_dswm_grid_cmd(
    base: Path = typer.Option(..., help="Base pipeline folder."),
    aligned: Path = typer.Option(..., help="Aligned (SFT+PPRL) pipeline folder."),
    distilled: Path = typer.Option(..., help="Distilled pipeline folder (the merged folders take its scheduler, VAE, text encoder)."),
    out: Path = typer.Option(Path("dswm-grid"), "--out", "-o", help="Merged folders, measurements, grid.json/md, best → the chosen folder."),
    lambdas_align: str = typer.Option("0.5,0.75,1,1.25"),
    lambdas_distill: str = typer.Option("0.5,0.75,1,1.25"),
    n: int = typer.Option(48, min=1, help="Selection prompts per seed."),
    seeds: str = typer.Option("10", help="Selection seeds: not the final table's."),
    max_iterations: int = typer.Option(6),
    region_draws: bool = typer.Option(False, help="Region draws in the selection loops."),
    device: str = typer.Option("auto", help="torch device: auto, cuda, cpu."),
) -> None:
    """DSWM λ grid: merge base + λa·(aligned − base) + λd·(distilled − base) for every pair, measure each on
    a selection set (single step and loop), pick the best loop rate (ties: single step, then λ nearest 1, 1)."""
    from clvr_agent.cli.common import resolve_device
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError
    from clvr_agent.eval.dswm_grid import dswm_grid
    from clvr_agent.eval.table import TableConfig

    try:
        cfg = TableConfig(n=n, seeds=tuple(_parse_list(seeds, "--seeds")), max_iterations=max_iterations,
                          region_draws=region_draws, colour_shape_seeds=0, edits=0, device=resolve_device(device),
                          progress=True)
        grid = dswm_grid(base, aligned, distilled, out, cfg, _parse_list(lambdas_align, "--lambdas-align", float),
                         _parse_list(lambdas_distill, "--lambdas-distill", float), log=lambda m: typer.echo(m, err=True))
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, OSError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo((out / "grid.md").read_text())
    typer.echo(f"chosen: {grid['best']['folder']} (linked as {out / 'best'})")


@eval_app.command("controller")
def eval_controller_cmd(
    controller: str = typer.Option("qwen3-vl", help="Controller under test: qwen3-vl, shapeworld or chat-model."),
    vlm: Optional[str] = typer.Option(None, help="--controller qwen3-vl: hub id, folder or shipped name (clvr-mini-vlm)."),
    n: int = typer.Option(300, min=1, help="Held-out prompts for the loops, spread over the six GenEval tags."),
    calls_n: int = typer.Option(60, min=0, help="Prompts whose oracle calls are put to the controller (plan/check/verify/correct)."),
    seed: int = typer.Option(100, help="Prompt seed (training data used other seeds)."),
    out: Path = typer.Option(Path("eval-controller"), "--out", "-o"),
    backend: str = typer.Option("shapeworld", help="Executor: shapeworld or clvr-mini."),
    max_iterations: int = typer.Option(8),
    dtype: str = typer.Option("float32", help="torch dtype of the VLM."),
    device: str = typer.Option("cpu", help="torch device of the VLM."),
    base_url: Optional[str] = typer.Option(None, help="--controller chat-model: OpenAI-compatible server."),
    model_name: Optional[str] = typer.Option(None, help="--controller chat-model: the served model."),
    overwrite: bool = typer.Option(False),
) -> None:
    """A controller as planner, verifier and loop driver vs the oracle and single step → summary.json, table.md."""
    from clvr_agent.eval.controller import eval_controller
    from clvr_agent.tools.registry import get_controller
    from clvr_agent.errors import MissingDependencyError, UnknownBackendError

    if calls_n > n:
        fail(f"--calls-n {calls_n} is more than --n {n}")
    _out_ok(out, overwrite)
    try:
        models = model_choice(backend=backend, controller=controller, vlm=vlm, base_url=base_url,
                              model_name=model_name, dtype=dtype, device=device)
        ctl = get_controller(controller, **models.controller_options)
        eval_controller(ctl, vlm or controller, n=n, calls_n=calls_n, seed=seed, out_dir=out,
                        backend=backend, max_iterations=max_iterations)
    except (UnknownBackendError, MissingDependencyError, FileNotFoundError, OSError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out / 'summary.json'} and {out / 'table.md'}")


@eval_app.command("score")
def score_cmd(
    images: Path = typer.Option(..., help="A GenEval-layout folder (each prompt folder has metadata.jsonl)."),
    out: Path = typer.Option(..., "--out", "-o"),
    detector: str = typer.Option("shapeworld", help="shapeworld, or mask2former for real images."),
    detector_model: Optional[str] = typer.Option(None, help="Mask2Former weights (hub id or folder)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP weights for colour (hub id or folder)."),
    device: str = typer.Option("cpu"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Score any GenEval-layout folder → OUT/results.jsonl (official fields) and OUT/summary.json."""
    if not images.is_dir():
        fail(f"--images {images} is not a folder")
    _out_ok(out, overwrite)
    if detector == "shapeworld":
        from clvr_agent.eval.shapeworld import score_folder

        summary = score_folder(images, out, detector="shapeworld")
    elif detector == "mask2former":
        from clvr_agent.cli.geneval import score_mask2former

        if not detector_model or not clip_model:
            fail("--detector mask2former needs --detector-model and --clip-model")
        summary = score_mask2former(images, out, detector_model=detector_model, clip_model=clip_model, device=device)
    else:
        fail(f"unknown detector {detector!r}; known: shapeworld, mask2former")
    typer.echo(json.dumps(summary, indent=2))


def probe_cmd(
    tiers: str = typer.Option("1-10", help="Complexity tiers (number of atomic constraints)."),
    per_tier: int = typer.Option(20, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("probe"), "--out", "-o"),
    backend: str = typer.Option("shapeworld"),
    region_draws: bool = typer.Option(True, help=_REGION_HELP),
    overwrite: bool = typer.Option(False),
) -> None:
    """Single-step vs loop pass rate by complexity tier → summary.json and probe.png."""
    from clvr_agent.eval.shapeworld import probe

    tier_list = _parse_tiers(tiers)
    _out_ok(out, overwrite)
    summary = probe(tiers=tier_list, per_tier=per_tier, seed=seed, out_dir=out, backend=backend,
                    controller_options=shapeworld_controller_options(backend, None, region_draws))
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    """Top-level commands that belong with evaluation (``clvr probe``) and real GenEval."""
    app.command("probe")(probe_cmd)
    try:
        from clvr_agent.cli.geneval import register as register_geneval
    except ModuleNotFoundError as exc:
        if exc.name != "clvr_agent.cli.geneval":
            raise
    else:
        register_geneval(eval_app)
