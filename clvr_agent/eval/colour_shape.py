"""Single-object colour+shape: does a klein pipeline draw the named colour and shape alone?

Draws "a photo of a {colour} {shape}" for every ShapeWorld colour × shape (60 prompts × ``seeds``) with
the pipeline's own sampler (base: 28 steps, CFG 4; distilled: 4 steps, no CFG, unless given), upscales
each canvas to the 256 px ShapeWorld canvas as the executor does, reads it with the ShapeWorld detector
and judges it with GenEval's ``colors`` rule. Reports the pass rate (``colour_shape``), colour-only and
shape-only hit rates, the strict rate (exactly one object, right class and colour) and the fraction of
seed-matched pairs whose canvases differ between two colour words (0 = text is ignored).
``scripts/clvr_mini/colour_shape.py`` is its command line.
"""

from __future__ import annotations

import time
from pathlib import Path


def measure(pipe, *, seeds: int = 1, size: int = 64, steps: int | None = None, guidance: float | None = None,
            save_grid: Path | None = None, units: bool = False) -> dict:
    """Colour+shape accuracy of ``pipe`` over every colour × shape prompt (see the module docstring).
    ``units``: also each canvas's verdict (``seed``, ``colour``, ``shape``, ``passed``), for paired intervals."""
    import numpy as np
    import torch
    from PIL import Image

    from clvr_agent.eval.rules import COLORS, THRESHOLD, evaluate_image
    from clvr_agent.tools.flux2_klein import prompt_max_length
    from clvr_agent.tools.shapeworld.detect import detect
    from clvr_agent.tools.shapeworld.world import CANVAS, CLASSES

    distilled = bool(pipe.config.is_distilled)
    steps = steps or (4 if distilled else 28)
    guidance = guidance if guidance is not None else (1.0 if distilled else 4.0)
    grid = [(c, s) for c in COLORS for s in CLASSES]
    t0 = time.perf_counter()
    images: dict[tuple[int, str, str], Image.Image] = {}
    with torch.no_grad():
        for seed in range(seeds):
            # One generator per prompt, all seeded alike: canvas differences come from the text only.
            gens = [torch.Generator().manual_seed(seed) for _ in grid]
            out = pipe(prompt=[f"a photo of a {c} {s}" for c, s in grid], height=size, width=size,
                       num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       max_sequence_length=prompt_max_length(pipe)).images
            images.update({(seed, c, s): im for (c, s), im in zip(grid, out)})
    passed, colour_hit, shape_hit, strict = [], [], [], []
    for (seed, c, s), im in images.items():
        dets = detect(im.convert("RGB").resize((CANVAS, CANVAS), Image.Resampling.LANCZOS))
        ok, _ = evaluate_image({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}]}, dets)
        good = [d for d in dets if d.score > THRESHOLD]
        passed.append(ok)
        colour_hit.append(any(d.color == c for d in good))
        shape_hit.append(any(d.cls == s for d in good))
        strict.append(len(good) == 1 and good[0].cls == s and good[0].color == c)
    diffs = []
    for seed in range(seeds):
        for s in CLASSES:
            arrs = [np.asarray(images[(seed, c, s)], dtype=np.float32) for c in COLORS]
            diffs += [float(np.abs(arrs[i] - arrs[i + 1]).mean() > 2.0) for i in range(len(arrs) - 1)]
    if save_grid:
        sheet = Image.new("RGB", (size * len(CLASSES), size * len(COLORS)))
        for (seed, c, s), im in images.items():
            if seed == 0:
                sheet.paste(im, (CLASSES.index(s) * size, COLORS.index(c) * size))
        sheet.save(save_grid)
    result = {"steps": steps, "guidance": guidance, "n": len(images), "colour_shape": float(np.mean(passed)),
              "colour_hit": float(np.mean(colour_hit)), "shape_hit": float(np.mean(shape_hit)),
              "strict": float(np.mean(strict)), "text_changes_canvas": float(np.mean(diffs)),
              "seconds": round(time.perf_counter() - t0, 1)}
    if units:
        result["units"] = [{"seed": seed, "colour": c, "shape": s, "passed": bool(ok)}
                           for (seed, c, s), ok in zip(images, passed)]
    return result
