"""DSWM's λ grid: merge base + λa·(aligned − base) + λd·(distilled − base) for every (λa, λd), measure
each merged model on a selection set, and pick one.

Each merge is ``clvr merge`` (:func:`~clvr_agent.training.merge.merge_checkpoints`, ``sum``) of the three
transformers, assembled into a pipeline folder from the distilled one (its scheduler, text encoder, VAE
and ``is_distilled``: the merged model draws at the student's 4 steps without CFG), as
``scripts/clvr_mini/stage5_merge.sh`` does. Each is measured as a table row
(:func:`~clvr_agent.eval.table.measure_row`, single step and loop only) on the selection seeds, which
must differ from the final table's so the choice is not scored on the prompts it was chosen on.

The criterion: the highest loop pass rate on the selection set; ties go to the higher single-step
rate, then to the λ closest to (1, 1) (|λa − 1| + |λd − 1|). Folders and measurements already there are
reused, so a killed grid continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from clvr_agent.eval.table import Row, TableConfig, measure_row

LAMBDAS = (0.5, 0.75, 1.0, 1.25)
PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae", "clvr_canvas.json")


def grid_name(lambda_align: float, lambda_distill: float) -> str:
    return f"a{lambda_align:g}-d{lambda_distill:g}"


def merged_folder(base: Path, aligned: Path, distilled: Path, out: Path, lambda_align: float,
                  lambda_distill: float) -> Path:
    """The merged pipeline folder ``out`` (made once: an existing complete folder is reused)."""
    from clvr_agent.training.merge import REPORT_NAME, MergeConfig, merge_checkpoints

    if (out / "model_index.json").is_file() and (out / REPORT_NAME).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_checkpoints(MergeConfig(base=base / "transformer", aligned=aligned / "transformer",
                                  distilled=distilled / "transformer", out=tmp / "transformer",
                                  lambda_align=lambda_align, lambda_distill=lambda_distill, method="sum"))
    (tmp / "transformer" / REPORT_NAME).rename(tmp / REPORT_NAME)
    for part in PIPELINE_PARTS:
        src = distilled / part
        if src.is_dir():
            shutil.copytree(src, tmp / part)
        elif src.is_file():
            shutil.copy(src, tmp / part)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def dswm_grid(base: str | Path, aligned: str | Path, distilled: str | Path, out: str | Path, cfg: TableConfig,
              lambdas_align: Iterable[float] = LAMBDAS, lambdas_distill: Iterable[float] = LAMBDAS,
              log: Callable[[str], None] = print) -> dict:
    """Merge and measure every (λa, λd) → ``OUT/<a…-d…>/`` (models), ``OUT/selection/`` (measurements),
    ``grid.json``, ``grid.md`` and ``OUT/best`` (a link to the chosen folder); returns the grid."""
    base, aligned, distilled, out = map(Path, (base, aligned, distilled, out))
    for role, folder in (("base", base), ("aligned", aligned), ("distilled", distilled)):
        if not (folder / "transformer").is_dir():
            raise FileNotFoundError(f"--{role} {folder} has no transformer/ folder; pass a pipeline folder")
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    for la in lambdas_align:
        for ld in lambdas_distill:
            name = grid_name(la, ld)
            log(f"λa {la:g}, λd {ld:g}")
            folder = merged_folder(base, aligned, distilled, out / name, la, ld)
            r = measure_row(Row(name, model=str(folder)), out / "selection", cfg, parts=("single", "loop"))
            cells.append({"name": name, "lambda_align": la, "lambda_distill": ld, "folder": str(folder),
                          "single": r["single"]["overall"], "loop": r["loop"]["overall"],
                          "loop_strict": r["loop"]["strict"], "mean_iterations": r["loop"]["mean_iterations"],
                          "nfe": r["nfe"]})
    best = max(cells, key=lambda c: (c["loop"], c["single"],
                                     -abs(c["lambda_align"] - 1) - abs(c["lambda_distill"] - 1)))
    link = out / "best"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(best["name"], target_is_directory=True)
    grid = {"base": str(base), "aligned": str(aligned), "distilled": str(distilled), "selection": asdict(cfg),
            "criterion": "highest loop pass rate on the selection set; ties: higher single step, then λ closest to (1, 1)",
            "cells": cells, "best": best}
    (out / "grid.json").write_text(json.dumps(grid, indent=1) + "\n")
    (out / "grid.md").write_text(_markdown(grid))
    return grid


def _markdown(grid: dict) -> str:
    cfg = grid["selection"]
    las = sorted({c["lambda_align"] for c in grid["cells"]})
    lds = sorted({c["lambda_distill"] for c in grid["cells"]})
    at = {(c["lambda_align"], c["lambda_distill"]): c for c in grid["cells"]}
    lines = [f"DSWM λ grid: loop (single step) pass rate on the selection set, n = {cfg['n']} × seeds "
             f"{', '.join(map(str, cfg['seeds']))}, loop budget {cfg['max_iterations']}, region draws "
             f"{'on' if cfg['region_draws'] else 'off'}. Chosen: **{grid['best']['name']}** ({grid['criterion']}).", "",
             "| λa \\ λd | " + " | ".join(f"{d:g}" for d in lds) + " |", "|---|" + "---|" * len(lds)]
    for a in las:
        cells = [f"{at[a, d]['loop']:.2f} ({at[a, d]['single']:.2f})" if (a, d) in at else "—" for d in lds]
        lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
