"""The ``clvr-mini`` backend over any stage folder, at its native resolution, handing the loop 256 px canvases.

``Flux2KleinExecutor`` now does this itself for a folder with ``clvr_canvas.json`` (``draw_size`` 64,
``canvas_size`` 256; the shipped folder has it); this adapter gives the same behaviour to the recipe's
stage folders, which do not, and loads them in float32 on the CPU. The text below is why it exists.

clvr-mini draws 64×64 canvases (8×8 latent tokens); the ShapeWorld detector is calibrated on 256 px
canvases (objects 24–72 px, ≥ 90 px² components). ``Flux2KleinExecutor`` has no notion of a native
size: with ``height=None`` it draws ``128 × vae_scale_factor`` = 512 px (4,096 tokens, off-distribution
and slow), and it returns canvases at the drawn size. Until the executor gains that option (see
docs/clvr_mini.md, "What the executor needs"), this adapter wraps the *same* executor object:

* requests without a size are drawn at the checkpoint's native size (``vae.config.sample_size``);
* reference canvases are resized to that size before the executor sees them;
* the drawn canvas is upscaled (Lanczos) to 256 px for the controller and the evaluator.

Measured ceiling of that round trip on ground-truth canvases (256 → 64 → 256, 60 GenEval prompts):
0.92 overall with Lanczos (counting 0.7; everything else ≥ 0.8).
"""

from __future__ import annotations

from typing import Optional

from PIL import Image

CANVAS = 256


class NativeSizeExecutor:
    """A ``Flux2KleinExecutor`` drawn at ``native`` px and shown to the loop at ``canvas`` px."""

    def __init__(self, inner, native: Optional[int] = None, canvas: int = CANVAS):
        self.inner = inner
        self.native = native or int(inner.pipe.vae.config.sample_size)
        self.canvas = canvas
        self.name = inner.name

    def generate(self, request, references: list[Image.Image], progress=None):
        from clvr_agent.tools.base import GenerationOutput

        side = self.native
        req = request.model_copy(update={"height": request.height or side, "width": request.width or side})
        refs = [im.convert("RGB").resize((req.width, req.height), Image.Resampling.LANCZOS) for im in references]
        out = self.inner.generate(req, refs, progress)
        image = out.image.resize((self.canvas, self.canvas), Image.Resampling.LANCZOS)
        return GenerationOutput(image=image, nfe=out.nfe, seconds=out.seconds,
                                info={**out.info, "canvas": self.canvas})

    def __getattr__(self, item):  # defaults(), size_multiple, pipe, … of the wrapped executor
        return getattr(self.inner, item)


def register(model: str, name: str = "clvr-mini") -> None:
    """Make ``--backend NAME`` (registry and ``create_clvr``) this adapter over the folder ``model``."""
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.tools.registry import clear_cache, executor_names, register_executor

    executor_names()  # registers the built-ins first, so ours replaces clvr-mini rather than being replaced

    def factory(**kw):
        kw.setdefault("model", model)
        kw.setdefault("torch_dtype", "float32")
        kw.setdefault("device", "cpu")
        return NativeSizeExecutor(Flux2KleinExecutor.from_pretrained(**kw))

    register_executor(name, factory)
    clear_cache()
