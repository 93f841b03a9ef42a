"""Benchmarks on plain files: GenEval-style eval, scoring any GenEval-layout folder, the complexity probe.

Every command writes JSONL/JSON results and a PNG chart, so runs can be diffed and re-plotted.
Pass/fail is always GenEval's rule (:mod:`clvr_agent.eval.rules`) on the ShapeWorld detector's view
of the final pixels, whatever produced them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import numpy as np

from clvr_agent.eval.rules import TAGS, evaluate_image, summarize
from clvr_agent.eval.sampling import Sampler, loop, prompt_seed, single_step

DETECTORS = ("shapeworld",)


def _detector(name: str):
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    from clvr_agent.tools.shapeworld.detect import detect

    return detect


def _bar(items: Iterable, total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)


def _sampler(mode: str, backend: str, workdir: str, max_iterations: int, executor_options: Optional[dict] = None,
             controller_options: Optional[dict] = None, request: Optional[dict] = None) -> Sampler:
    """``single`` (one executor call) or ``loop`` (the CLVR graph) on the named backend.

    ``executor_options`` and ``controller_options`` go to the registry (e.g. ``{"model": folder}``,
    ``{"region_draws": False}``); ``request`` (``steps``, ``guidance``) to every executor call of both modes."""
    if mode not in ("single", "loop"):
        raise ValueError(f"mode must be 'single' or 'loop', got {mode!r}")
    request = {k: v for k, v in (request or {}).items() if v is not None}
    if mode == "single":
        from clvr_agent.tools.registry import get_executor

        return single_step(get_executor(backend, **(executor_options or {})), **request)
    from clvr_agent.app.api import create_clvr

    return loop(create_clvr(backend, executor_options=executor_options, controller_options=controller_options,
                            artifact_dir=workdir, max_iterations=max_iterations, **request))


def run_lines(lines: list[dict], sample: Sampler, seed: int, progress: bool = False, desc: str = "",
              samples_dir: Optional[Path] = None, on_row: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """One row per prompt line: passed (GenEval's rule on the detector's view), iterations, status.
    A run with no final image does not pass. ``on_row(i, row)`` is called after each prompt."""
    detect = _detector("shapeworld")
    rows = []
    for i, line in enumerate(_bar(lines, len(lines), desc, progress)):
        image, iterations, status = sample(line["prompt"], prompt_seed(seed, i))
        passed, reason = evaluate_image(line, detect(image)) if image is not None else (False, f"no image ({status})")
        if samples_dir is not None and image is not None:
            folder = samples_dir / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(line) + "\n")
            image.save(folder / "samples" / "0000.png")
        rows.append({"index": i, "tag": line["tag"], "tier": line["tier"], "prompt": line["prompt"],
                     "passed": bool(passed), "iterations": iterations, "status": status, "reason": reason})
        if on_row is not None:
            on_row(i, rows[-1])
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_lines(lines: list[dict], mode: str, seed: int, backend: str, progress: bool, desc: str,
               samples_dir: Optional[Path] = None, max_iterations: int = 8, **options) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="clvr-eval-") as work:
        return run_lines(lines, _sampler(mode, backend, work, max_iterations, **options), seed, progress, desc,
                         samples_dir)


def eval_shapeworld(
    mode: Literal["single", "loop"] = "single",
    n: int = 120,
    seed: int = 0,
    out_dir: str = "eval-shapeworld",
    backend: str = "shapeworld",
    progress: bool = True,
    max_iterations: int = 8,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    request: Optional[dict] = None,
) -> dict:
    """GenEval-style benchmark over ShapeWorld: ``n`` prompts cycling the six tasks.

    Writes ``results.jsonl``, ``summary.json`` (``overall``, ``per_tag``, ``mean_iterations``),
    the prompts and images in GenEval's folder layout, and ``summary.png``. The options are
    :func:`_sampler`'s (a model folder, ``{"region_draws": False}``, steps and guidance).
    """
    from clvr_agent.tools.shapeworld.language import geneval_lines

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = geneval_lines(n, seed)
    options = dict(executor_options=executor_options, controller_options=controller_options, request=request)
    rows = _run_lines(lines, mode, seed, backend, progress, f"eval {mode}", samples_dir=out,
                      max_iterations=max_iterations, **options)
    _write_jsonl(out / "results.jsonl", rows)
    summary = summarize([{"tag": r["tag"], "correct": r["passed"]} for r in rows])
    summary.update(mean_iterations=float(np.mean([r["iterations"] for r in rows])), n=n, mode=mode,
                   seed=seed, backend=backend, max_iterations=max_iterations,
                   **{k: v for k, v in options.items() if v})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_tags(summary, out / "summary.png", f"ShapeWorld GenEval-style, {mode} (n={n})")
    return summary


def score_folder(images_dir: str, out_dir: str, detector: str = "shapeworld") -> dict:
    """Score a GenEval-layout folder with the ShapeWorld detector (:func:`clvr_agent.eval.geneval.score_folder`)."""
    from clvr_agent.eval.geneval import score_folder as score

    return score(Path(images_dir), Path(out_dir), _detector(detector), detector=detector)


def probe(
    tiers: Iterable[int] = range(1, 11),
    per_tier: int = 20,
    seed: int = 0,
    out_dir: str = "probe-shapeworld",
    backend: str = "shapeworld",
    progress: bool = True,
    max_iterations: int = 8,
    executor_options: Optional[dict] = None,
    controller_options: Optional[dict] = None,
    request: Optional[dict] = None,
) -> dict:
    """Pass rate against prompt complexity (tier = atomic constraints), single step vs the loop.

    Writes ``summary.json`` (``single`` and ``loop``, each with ``pass_by_tier`` and ``auc`` = mean
    pass over tiers x 100), ``results.jsonl`` and ``probe.png``.
    """
    from clvr_agent.tools.shapeworld.language import tier_lines

    tiers = list(tiers)
    if per_tier < 1:
        raise ValueError(f"per_tier must be at least 1, got {per_tier}")
    lines = tier_lines(tiers, per_tier, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(executor_options=executor_options, controller_options=controller_options, request=request)
    summary: dict = {"tiers": tiers, "per_tier": per_tier, "seed": seed, "backend": backend,
                     "max_iterations": max_iterations, **{k: v for k, v in options.items() if v}}
    all_rows = []
    for mode in ("single", "loop"):
        rows = _run_lines(lines, mode, seed, backend, progress, f"probe {mode}", max_iterations=max_iterations,
                          **options)
        passes = [float(np.mean([r["passed"] for r in rows if r["tier"] == t])) for t in tiers]
        iters = [float(np.mean([r["iterations"] for r in rows if r["tier"] == t])) for t in tiers]
        summary[mode] = {"pass_by_tier": passes, "auc": float(np.mean(passes) * 100), "iterations_by_tier": iters}
        all_rows += [{"mode": mode, **r} for r in rows]
    _write_jsonl(out / "results.jsonl", all_rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_probe(summary, out / "probe.png")
    return summary


def _plot_tags(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [t for t in TAGS if t in summary["per_tag"]] + [t for t in summary["per_tag"] if t not in TAGS]
    values = [summary["per_tag"][t] for t in tags] + [summary["overall"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(tags + ["overall"], values, color=["#4c72b0"] * len(tags) + ["#dd8452"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_probe(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("single", "o--"), ("loop", "s-")):
        s = summary[mode]
        ax.plot(summary["tiers"], s["pass_by_tier"], style, label=f"{mode} (AUC {s['auc']:.1f})")
    ax.set_xlabel("tier (atomic constraints)")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(summary["tiers"])
    ax.legend()
    ax.set_title("ShapeWorld complexity probe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
