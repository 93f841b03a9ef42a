"""The ``clvr-mini`` backend over any stage folder: drawn at its native size, 256 px canvases for the loop.

The shipped folder carries ``clvr_canvas.json`` (``draw_size`` 64, ``canvas_size`` 256, its base CFG
scale), which ``Flux2KleinExecutor`` reads. The recipe's stage folders do not, so this registers the
same executor with ``draw_size`` = the VAE's ``sample_size`` and ``canvas_size`` = 256 unless the folder
says otherwise, loaded in float32 on the CPU. Without it the executor would draw at
``128 × vae_scale_factor`` = 512 px (off-distribution and slow) and hand the ShapeWorld detector, which
is calibrated on 256 px canvases, canvases of the wrong size.

Measured ceiling of the 256 → 64 → 256 round trip on ground-truth canvases (60 GenEval prompts):
0.92 overall with Lanczos (counting 0.7; everything else ≥ 0.8).
"""

from __future__ import annotations

import json
from pathlib import Path

CANVAS = 256


def register(model: str, name: str = "clvr-mini") -> None:
    """Make ``--backend NAME`` (registry and ``create_clvr``) the klein executor over the folder ``model``."""
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor, canvas_config
    from clvr_agent.tools.registry import clear_cache, executor_names, register_executor

    executor_names()  # registers the built-ins first, so ours replaces clvr-mini rather than being replaced
    own = canvas_config(Path(model))
    native = json.loads((Path(model) / "vae" / "config.json").read_text())["sample_size"]

    def factory(**kw):
        kw.setdefault("model", model)
        kw.setdefault("torch_dtype", "float32")
        kw.setdefault("device", "cpu")
        kw.setdefault("draw_size", own.get("draw_size", native))
        kw.setdefault("canvas_size", own.get("canvas_size", CANVAS))
        return Flux2KleinExecutor.from_pretrained(**kw)

    register_executor(name, factory)
    clear_cache()
