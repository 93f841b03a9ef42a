"""Benchmarks on plain files: GenEval-style eval, scoring any GenEval-layout folder, the complexity probe.

Every command writes JSONL/JSON results and a PNG chart, so runs can be diffed and re-plotted.
Pass/fail is always GenEval's rule (:mod:`clvr_agent.geneval`) on the ShapeWorld detector's view
of the final pixels, whatever produced them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Literal, Optional

import numpy as np
from PIL import Image

from clvr_agent.geneval import TAGS, evaluate_image, summarize

DETECTORS = ("shapeworld",)


def _detector(name: str):
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    from clvr_agent.tools.shapeworld.detect import detect

    return detect


def _bar(items: Iterable, total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)


def _prompt_seed(seed: int, i: int) -> int:
    return (seed * 100_003 + i) % (2**31 - 1)


class _Runner:
    """Draws one prompt in ``single`` mode (one executor call) or ``loop`` mode (the CLVR graph)."""

    def __init__(self, mode: str, backend: str, workdir: str, max_iterations: int = 8) -> None:
        if mode not in ("single", "loop"):
            raise ValueError(f"mode must be 'single' or 'loop', got {mode!r}")
        self.mode = mode
        if mode == "single":
            from clvr_agent.tools.registry import get_executor

            self.executor = get_executor(backend)
        else:
            from clvr_agent.api import create_clvr

            self.runnable = create_clvr(backend, artifact_dir=workdir, max_iterations=max_iterations)

    def __call__(self, prompt: str, seed: int) -> tuple[Image.Image, int, str]:
        """(final image, iterations, status)."""
        if self.mode == "single":
            from clvr_agent.types import ExecutorRequest

            request = ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt, seed=seed)
            return self.executor.generate(request, []).image, 1, "single"
        out = self.runnable.invoke({"prompt": prompt, "seed": seed})
        if not out.get("final_image"):
            raise RuntimeError(f"the loop produced no image for {prompt!r}: {out.get('stop_reason')}")
        with Image.open(out["final_image"]) as im:
            return im.convert("RGB"), int(out["iterations"]), str(out["status"])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_lines(lines: list[dict], mode: str, seed: int, backend: str, progress: bool, desc: str,
               samples_dir: Optional[Path] = None, max_iterations: int = 8) -> list[dict]:
    detect = _detector("shapeworld")
    rows = []
    with tempfile.TemporaryDirectory(prefix="clvr-eval-") as work:
        run = _Runner(mode, backend, work, max_iterations)
        for i, line in enumerate(_bar(lines, len(lines), desc, progress)):
            image, iterations, status = run(line["prompt"], _prompt_seed(seed, i))
            passed, reason = evaluate_image(line, detect(image))
            if samples_dir is not None:
                folder = samples_dir / f"{i:05d}"
                (folder / "samples").mkdir(parents=True, exist_ok=True)
                (folder / "metadata.jsonl").write_text(json.dumps(line) + "\n")
                image.save(folder / "samples" / "0000.png")
            rows.append({"tag": line["tag"], "tier": line["tier"], "prompt": line["prompt"], "passed": passed,
                         "iterations": iterations, "status": status, "reason": reason})
    return rows


def eval_shapeworld(
    mode: Literal["single", "loop"] = "single",
    n: int = 120,
    seed: int = 0,
    out_dir: str = "eval-shapeworld",
    backend: str = "shapeworld",
    progress: bool = True,
    max_iterations: int = 8,
) -> dict:
    """GenEval-style benchmark over ShapeWorld: ``n`` prompts cycling the six tasks.

    Writes ``results.jsonl``, ``summary.json`` (``overall``, ``per_tag``, ``mean_iterations``),
    the prompts and images in GenEval's folder layout, and ``summary.png``.
    """
    from clvr_agent.tools.shapeworld.language import geneval_lines

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = geneval_lines(n, seed)
    rows = _run_lines(lines, mode, seed, backend, progress, f"eval {mode}", samples_dir=out,
                      max_iterations=max_iterations)
    _write_jsonl(out / "results.jsonl", rows)
    summary = summarize([{"tag": r["tag"], "correct": r["passed"]} for r in rows])
    summary.update(mean_iterations=float(np.mean([r["iterations"] for r in rows])), n=n, mode=mode,
                   seed=seed, backend=backend, max_iterations=max_iterations)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_tags(summary, out / "summary.png", f"ShapeWorld GenEval-style, {mode} (n={n})")
    return summary


def score_folder(images_dir: str, out_dir: str, detector: str = "shapeworld", progress: bool = True) -> dict:
    """Score a GenEval-layout folder (``NNNNN/metadata.jsonl`` + ``NNNNN/samples/*.png``).

    Writes ``results.jsonl`` with the official evaluator's fields (``filename``, ``tag``,
    ``prompt``, ``correct``, ``reason``, ``metadata``) and ``summary.json``.
    """
    detect = _detector(detector)
    root = Path(images_dir)
    folders = sorted(p for p in root.iterdir() if (p / "metadata.jsonl").is_file()) if root.is_dir() else []
    if not folders:
        raise ValueError(f"no GenEval prompt folders (NNNNN/metadata.jsonl) under {images_dir}")
    rows = []
    for folder in _bar(folders, len(folders), "score", progress):
        metadata = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        for png in sorted((folder / "samples").glob("*.png")):
            with Image.open(png) as im:
                correct, reason = evaluate_image(metadata, detect(im.convert("RGB")))
            rows.append({"filename": str(png), "tag": metadata["tag"], "prompt": metadata["prompt"],
                         "correct": correct, "reason": reason, "metadata": json.dumps(metadata)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "results.jsonl", rows)
    summary = summarize(rows)
    summary.update(images=len(rows), prompts=len(folders), detector=detector)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def probe(
    tiers: Iterable[int] = range(1, 11),
    per_tier: int = 20,
    seed: int = 0,
    out_dir: str = "probe-shapeworld",
    backend: str = "shapeworld",
    progress: bool = True,
    max_iterations: int = 8,
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
    summary: dict = {"tiers": tiers, "per_tier": per_tier, "seed": seed, "backend": backend,
                     "max_iterations": max_iterations}
    all_rows = []
    for mode in ("single", "loop"):
        rows = _run_lines(lines, mode, seed, backend, progress, f"probe {mode}", max_iterations=max_iterations)
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
