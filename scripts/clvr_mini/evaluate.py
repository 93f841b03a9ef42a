"""Measure one clvr-mini row: ShapeWorld GenEval-style pass rate, single step vs the CLVR loop.

Runs ``clvr_agent.eval.shapeworld.eval_shapeworld`` (what ``clvr eval shapeworld --backend clvr-mini`` runs)
with the ``clvr-mini`` backend pointed at ``--model`` through ``mini_backend`` (native 64 px drawing,
256 px canvases), and writes ``OUT/row.json``: NFE per executor call, single and loop summaries,
mean loop iterations and wall time per loop, and ``colour_shape.py``'s single-object colour+shape rate.
``--probe`` adds the complexity probe (single vs loop).

  python scripts/clvr_mini/evaluate.py --model DIR --row base --out clvr_mini_work/eval/base --n 30
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def nfe_per_generate(name: str) -> dict:
    from clvr_agent.tools.registry import get_executor
    from clvr_agent.types import ExecutorRequest

    ex = get_executor(name)
    req = ExecutorRequest(mode="generate", instruction="a photo of a red circle", accumulated_prompt="a photo of a red circle", seed=0)
    t0 = time.perf_counter()
    out = ex.generate(req, [])
    steps, guidance = ex.defaults()
    return {"nfe": out.nfe, "steps": steps, "guidance": guidance, "cfg": out.info["cfg"],
            "seconds_per_generate": round(time.perf_counter() - t0, 3), "drawn": [out.info["width"], out.info["height"]]}


def strict_pass(folder: Path) -> dict:
    """GenEval's pass *and* no extra objects: as many detections (score > 0.3) as the prompt names.

    The ShapeWorld detector reads blobs in noise as shapes, so GenEval's "at least one X" rules pass on
    a noisy canvas (a random-init model scores ~1.0 on single_object); this stricter rate does not.
    """
    import numpy as np
    from PIL import Image

    from clvr_agent.eval.rules import THRESHOLD
    from clvr_agent.tools.shapeworld.detect import detect

    rows = [json.loads(ln) for ln in (folder / "results.jsonl").read_text().splitlines() if ln.strip()]
    ok, extra = [], []
    for i, r in enumerate(rows):
        line = json.loads((folder / f"{i:05d}" / "metadata.jsonl").read_text().splitlines()[0])
        with Image.open(folder / f"{i:05d}" / "samples" / "0000.png") as im:
            found = sum(d.score > THRESHOLD for d in detect(im.convert("RGB")))
        need = sum(c["count"] for c in line["include"])
        ok.append(bool(r["passed"]) and found == need)
        extra.append(found - need)
    return {"strict_overall": float(np.mean(ok)), "mean_extra_objects": float(np.mean(extra))}


def main() -> None:
    import torch

    from clvr_agent.eval.shapeworld import eval_shapeworld, probe
    from mini_backend import register

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--row", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="single,loop")
    p.add_argument("--probe", default="", help="tiers for the complexity probe, e.g. 1,2,3,4,5,6 (empty: none)")
    p.add_argument("--per-tier", type=int, default=10)
    p.add_argument("--max-iterations", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--colour-shape-seeds", type=int, default=2,
                   help="seeds of colour_shape.py's 60-prompt single-object colour+shape measurement (0: skip)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    register(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    row = {"row": a.row, "model": a.model, "n": a.n, "seed": a.seed, **nfe_per_generate("clvr-mini")}
    if a.colour_shape_seeds:
        from colour_shape import load, measure

        row["colour_shape"] = measure(load(a.model, None)[0], seeds=a.colour_shape_seeds,
                                      steps=row["steps"], guidance=row["guidance"])  # as the executor draws
        print("colour_shape", json.dumps(row["colour_shape"]), flush=True)
    for mode in [m for m in a.modes.split(",") if m]:
        t0 = time.perf_counter()
        summary = eval_shapeworld(mode=mode, n=a.n, seed=a.seed, out_dir=str(a.out / mode), backend="clvr-mini",
                                 progress=False, max_iterations=a.max_iterations)
        row[mode] = {"overall": summary["overall"], "per_tag": summary["per_tag"],
                     "mean_iterations": summary["mean_iterations"],
                     "seconds_per_prompt": round((time.perf_counter() - t0) / a.n, 2),
                     **strict_pass(a.out / mode)}
        print(mode, json.dumps(row[mode]), flush=True)
    if a.probe:
        tiers = [int(t) for t in a.probe.split(",")]
        kw = {"per_tier": a.per_tier, "seed": a.seed, "out_dir": str(a.out / "probe"), "backend": "clvr-mini"}
        if "progress" in inspect.signature(probe).parameters:
            kw["progress"] = False
        s = probe(tiers, **kw)
        row["probe"] = {"tiers": tiers, "single": s["single"], "loop": s["loop"]}
    (a.out / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
