"""FLUX.2 [klein] executor: diffusers' klein pipelines behind the :class:`Executor` protocol.

One loaded checkpoint serves three modes with the same components (nothing is loaded twice):
``generate`` (text→image), ``edit`` (the last K canvases as reference images) and ``inpaint``
(``Flux2KleinInpaintPipeline`` over the latest canvas, masked to ``request.region``; with
``request.region_prompt`` the region alone is drawn afresh from that prompt at the native size and
pasted in — how a model that draws lone objects well adds one where the controller says). A KV checkpoint
(``model_index.json`` names ``Flux2KleinKVPipeline``) caches reference tokens across steps.

Conditioning is trajectory-accumulative: the prompt is ``request.accumulated_prompt`` verbatim (the
original prompt and every instruction so far, one per line) and the references are the canvases the
graph passes in. NFE is counted with a forward hook on the transformer, so a distilled call reports
4 and a base (CFG) call 2 × steps.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from clvr_agent.protocols import GenerationOutput, ProgressFn
from clvr_agent.errors import Cancelled
from clvr_agent.tools.loading import model_source, parse_dtype, shipped_model
from clvr_agent.types import ExecutorRequest, Region

logger = logging.getLogger(__name__)

# The hidden states diffusers' klein pipelines stack into the prompt embedding (their default). A
# checkpoint fits when its text encoder has ≥ 27 layers and joint_attention_dim == 3 × hidden size.
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
DISTILLED_STEPS, DISTILLED_GUIDANCE = 4, 1.0
# 28 base steps is a cost choice for a loop that draws several canvases per prompt, not the models'
# recommendation: diffusers' own Flux2KleinPipeline example (FLUX.2-klein-base-9B) runs 50 steps at
# guidance 4, and BFL's flux2 README calls Base the 50-step model. --steps 50 restores it.
BASE_STEPS, BASE_GUIDANCE = 28, 4.0
# The pipelines pad every prompt to this many tokens; a checkpoint may ask for fewer through its
# tokenizer's model_max_length (the tiny ones do, to stay fast on CPU).
MAX_SEQUENCE_LENGTH = 512
# Reference limits of Flux2ImageProcessor.check_image_input and the pipelines' resize.
MIN_SIDE, MAX_AREA, MAX_ASPECT = 64, 1024 * 1024, 8.0
# Inpaint re-draws the masked box from pure noise; the whole canvas still conditions it as a
# reference, and the unmasked area is kept. strength 1.0 also keeps NFE == steps.
INPAINT_STRENGTH = 1.0

_PIPELINE_CLASSES = ("Flux2KleinPipeline", "Flux2KleinKVPipeline")
_WEIGHTED_COMPONENTS = ("transformer", "vae", "text_encoder")
_CONFIG_COMPONENTS = ("tokenizer", "scheduler")


class CheckpointError(ValueError):
    """The path or hub id does not hold a loadable FLUX.2 [klein] checkpoint; the message says why."""


def clvr_mini_path() -> Path:
    """Where the trained ``clvr-mini`` klein checkpoint lives inside the package."""
    try:
        return shipped_model("clvr-mini")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc} (or pass --model DIR with a FLUX.2 [klein] folder)") from None


class Flux2KleinExecutor:
    """Draws and edits canvases with a loaded klein pipeline; share one per process (see the registry)."""

    name = "flux2-klein"

    def __init__(
        self,
        pipe,
        *,
        source: str = "<in-memory pipeline>",
        draw_size: Optional[int] = None,
        canvas_size: Optional[int] = None,
        base_guidance: Optional[float] = None,
    ):
        """``draw_size``: the side the checkpoint draws at when a request names no size (references are
        resized to it). ``canvas_size``: the side of the canvas handed back to the loop (resized with
        Lanczos) — for a model trained at a small native size, such as clvr-mini (64 → 256).
        ``base_guidance``: the CFG scale a non-distilled checkpoint draws with when a request names
        none (default 4.0, klein's; clvr-mini's folder sets the scale measured best for it)."""
        from diffusers import Flux2KleinInpaintPipeline, Flux2KleinKVPipeline, Flux2KleinPipeline

        if not isinstance(pipe, (Flux2KleinPipeline, Flux2KleinKVPipeline)):
            raise TypeError(f"expected a Flux2KleinPipeline or Flux2KleinKVPipeline, got {type(pipe).__name__}")
        _check_out_layers(pipe, source)
        self.pipe = pipe
        self.source = source
        self.draw_size = draw_size
        self.canvas_size = canvas_size
        if base_guidance is not None and base_guidance < 1.0:
            raise ValueError(f"base_guidance must be ≥ 1 (1 turns CFG off), got {base_guidance}")
        self.base_guidance = BASE_GUIDANCE if base_guidance is None else float(base_guidance)
        self.is_kv = isinstance(pipe, Flux2KleinKVPipeline)
        # The KV pipeline is step-distilled by construction and has no guidance argument.
        self.is_distilled = self.is_kv or bool(pipe.config.get("is_distilled", False))
        # Same modules and scheduler, no copy and no dtype change (from_pipe would cast to float32).
        self.inpaint_pipe = Flux2KleinInpaintPipeline(
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            transformer=pipe.transformer,
            is_distilled=self.is_distilled,
        )
        self.max_sequence_length = prompt_max_length(pipe)
        self.inpaint_pipe.set_progress_bar_config(disable=True)
        self.pipe.set_progress_bar_config(disable=True)
        # Pipelines hold per-call state (scheduler timesteps, _interrupt): one call at a time.
        self._lock = threading.Lock()

    @classmethod
    def from_pipeline(cls, pipe) -> "Flux2KleinExecutor":
        """Wrap a pipeline already in memory (tests, benchmarks, trainers)."""
        return cls(pipe)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        torch_dtype: str | torch.dtype = "bfloat16",
        device: Optional[str] = None,
        offload: bool = False,
        draw_size: Optional[int] = None,
        canvas_size: Optional[int] = None,
    ) -> "Flux2KleinExecutor":
        """Load a klein checkpoint from a local diffusers folder or a hub id (safetensors only).

        ``device`` defaults to ``cuda`` when available. ``offload`` keeps each component on the CPU
        until it runs (``enable_model_cpu_offload``). A local folder never triggers a download.
        """
        dtype = parse_dtype(torch_dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if offload and torch.device(device).type == "cpu":
            raise ValueError("offload=True moves components to an accelerator on demand; pass device='cuda'")
        local = _local_folder(model)
        index = _check_folder(local) if local is not None else _hub_index(model)
        class_name = index.get("_class_name")
        if class_name not in _PIPELINE_CLASSES:
            raise CheckpointError(
                f"{model}: model_index.json names {class_name!r}; expected one of {', '.join(_PIPELINE_CLASSES)}"
            )
        import diffusers

        pipeline_class = getattr(diffusers, class_name)
        offline = local is not None or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            pipe = pipeline_class.from_pretrained(
                str(local or model), dtype=dtype, use_safetensors=True, local_files_only=offline
            )
        except OSError as exc:  # diffusers' missing-file errors; say which checkpoint and why
            raise CheckpointError(f"could not load FLUX.2 [klein] checkpoint {model}: {exc}") from exc
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        sizes = canvas_config(local) if local is not None else {}
        executor = cls(pipe, source=model, draw_size=draw_size or sizes.get("draw_size"),
                       canvas_size=canvas_size or sizes.get("canvas_size"), base_guidance=sizes.get("guidance"))
        if offload:
            executor.inpaint_pipe.enable_model_cpu_offload(device=device)
        return executor

    @property
    def size_multiple(self) -> int:
        """Output sides must be multiples of this (VAE downsampling × 2×2 latent patches)."""
        return self.pipe.vae_scale_factor * 2

    @property
    def native_side(self) -> int:
        """Side of the square the checkpoint draws best at: the folder's draw_size, else the pipeline's
        default (``default_sample_size`` × VAE factor: 128 × 8 = 1024 for klein)."""
        return self.draw_size or self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def defaults(self) -> tuple[int, float]:
        """(steps, guidance) when the request leaves them unset: 4 / 1.0 distilled, 28 / ``base_guidance`` base (CFG)."""
        return (DISTILLED_STEPS, DISTILLED_GUIDANCE) if self.is_distilled else (BASE_STEPS, self.base_guidance)

    @torch.no_grad()
    def generate(
        self,
        request: ExecutorRequest,
        references: list[Image.Image],
        progress: Optional[ProgressFn] = None,
    ) -> GenerationOutput:
        """Run one pipeline call. ``progress(done, total)`` is called after each denoising step
        (``done`` counts from 1); returning True stops the call and raises :class:`Cancelled`."""
        pipe, kwargs = self._call_arguments(request, references)
        with self._lock:
            device = pipe._execution_device
            kwargs["generator"] = torch.Generator(device).manual_seed(request.seed)
            nfe, done, cancelled = 0, 0, False

            def count_forward(module, args, output):
                nonlocal nfe
                nfe += 1

            def on_step_end(p, i, t, callback_kwargs):
                nonlocal done, cancelled
                done = i + 1
                if progress is not None and progress(done, p.num_timesteps):
                    cancelled = True
                    p._interrupt = True  # diffusers skips the remaining steps
                return callback_kwargs

            hook = pipe.transformer.register_forward_hook(count_forward)
            t0 = time.perf_counter()
            try:
                image = pipe(callback_on_step_end=on_step_end, **kwargs).images[0]
            finally:
                hook.remove()
            seconds = time.perf_counter() - t0
        region_prompt = request.region_prompt if request.mode == "inpaint" else None  # what the pipeline read
        if region_prompt:
            image = paste_region(references[-1], image, request.region)
        if self.canvas_size and image.size != (self.canvas_size, self.canvas_size):
            image = image.resize((self.canvas_size, self.canvas_size), Image.Resampling.LANCZOS)
        if cancelled:
            raise Cancelled(f"cancelled after {done} of {kwargs['num_inference_steps']} denoising steps")
        info = {
            "pipeline": type(pipe).__name__,
            "steps": kwargs["num_inference_steps"],
            "guidance": kwargs.get("guidance_scale"),
            "cfg": not self.is_distilled and kwargs.get("guidance_scale", 1.0) > 1,  # diffusers' rule
            "references": len(kwargs["image"]) if request.mode == "edit" else int(request.mode == "inpaint"),
            "height": kwargs["height"],
            "width": kwargs["width"],
            "region_prompt": region_prompt,
            "prompt_tokens": self.prompt_tokens(region_prompt or request.accumulated_prompt),
            "max_sequence_length": self.max_sequence_length,
        }
        if info["prompt_tokens"] > self.max_sequence_length:
            logger.warning(
                "accumulated prompt is %d tokens (limit %d): oldest instructions dropped, the latest kept (and the prompt, cut if it must be)",
                info["prompt_tokens"], self.max_sequence_length,
            )
        return GenerationOutput(image=image, nfe=nfe, seconds=seconds, info=info)

    def _call_arguments(self, request: ExecutorRequest, references: list[Image.Image]) -> tuple[object, dict]:
        """Pick the pipeline for ``request.mode`` and build its keyword arguments (no generator yet)."""
        default_steps, default_guidance = self.defaults()
        steps = request.steps or default_steps
        guidance = default_guidance if request.guidance is None else request.guidance
        kwargs = dict(
            prompt=self.fit_prompt(request.accumulated_prompt),
            num_inference_steps=steps,
            text_encoder_out_layers=text_encoder_out_layers(self.pipe),
            max_sequence_length=self.max_sequence_length,
            output_type="pil",
        )
        originals = references
        if self.draw_size:
            side = self.draw_size
            references = [im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS) for im in references]
        refs = [fit_reference(im) for im in references] if request.mode != "generate" else []
        if request.mode == "generate":
            pipe = self.pipe  # regenerate: the accumulated prompt alone, no references
            height, width = self._size(request, None)
        elif request.mode == "edit":
            if not refs:
                raise ValueError("mode 'edit' needs at least one reference canvas; use 'generate' to draw afresh")
            pipe = self.pipe
            height, width = self._size(request, refs[-1])  # default: the latest canvas's size
            kwargs["image"] = refs
        elif request.mode == "inpaint" and request.region_prompt:
            if not refs or request.region is None:
                raise ValueError("mode 'inpaint' needs a reference canvas and request.region")
            # Regional draw: the region alone, drawn afresh from its own prompt at the checkpoint's
            # native area in the region's aspect ratio; generate() resizes it into the region ("inpaint
            # only masked" at strength 1). request.height/width size the canvas, not this tile.
            pipe = self.pipe
            check_region(request.region, originals[-1].size)
            r = request.region
            height, width = region_draw_size(r.x1 - r.x0, r.y1 - r.y0, self.native_side, self.size_multiple)
            kwargs["prompt"] = self.fit_prompt(request.region_prompt)
        elif request.mode == "inpaint":
            if not refs or request.region is None:
                raise ValueError("mode 'inpaint' needs a reference canvas and request.region")
            pipe = self.inpaint_pipe
            height, width = self._size(request, refs[-1])
            canvas = refs[-1]
            region = scale_region(request.region, originals[-1].size, (width, height))
            kwargs.update(
                image=canvas.resize((width, height), Image.Resampling.BICUBIC) if canvas.size != (width, height) else canvas,
                mask_image=region_mask(region, (width, height)),
                strength=INPAINT_STRENGTH,
            )
        else:
            raise ValueError(f"unknown mode {request.mode!r}; expected generate, edit or inpaint")
        kwargs.update(height=height, width=width)
        if not (self.is_kv and pipe is self.pipe):  # the KV pipeline takes no guidance (distilled only)
            kwargs["guidance_scale"] = guidance
        return pipe, kwargs

    def fit_prompt(self, accumulated: str) -> str:
        """The accumulated prompt cut to the text encoder's length by dropping the *oldest* instructions.

        The newest instruction (the one this step must execute) always stays; line 1, the user's
        prompt, stays too, cut at its end if it and the newest do not fit together; then as many of
        the more recent other instructions as fit. (Plain truncation would cut the newest instruction.)
        """
        limit = self.max_sequence_length
        if self.prompt_tokens(accumulated) <= limit:
            return accumulated
        head, *instructions = accumulated.split("\n")
        if not instructions:  # one long line: the pipeline truncates it
            return accumulated
        *older, newest = instructions
        if self.prompt_tokens(f"{head}\n{newest}") > limit:
            cut = self._head_prefix(head, newest)
            return f"{cut}\n{newest}" if cut else newest
        kept: list[str] = []
        for line in reversed(older):
            if self.prompt_tokens("\n".join([head, line, *kept, newest])) > limit:
                break
            kept.insert(0, line)
        return "\n".join([head, *kept, newest])

    def _head_prefix(self, head: str, newest: str) -> str:
        """The longest token prefix of ``head`` that still fits in front of ``newest`` ('' if none)."""
        tok = self.pipe.tokenizer
        ids = tok(head, add_special_tokens=False).input_ids
        lo, hi = 0, len(ids)
        while lo < hi:  # largest k whose prefix fits; the count grows with k
            k = (lo + hi + 1) // 2
            if self.prompt_tokens(f"{tok.decode(ids[:k])}\n{newest}") <= self.max_sequence_length:
                lo = k
            else:
                hi = k - 1
        return tok.decode(ids[:lo]).rstrip()

    def prompt_tokens(self, prompt: str) -> int:
        """Token count of ``prompt`` as the text encoder sees it (chat template included, no padding)."""
        messages = [{"role": "user", "content": prompt}]
        text = self.pipe.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return len(self.pipe.tokenizer(text).input_ids)

    def _size(self, request: ExecutorRequest, canvas: Optional[Image.Image]) -> tuple[Optional[int], Optional[int]]:
        """(height, width): the request's, else the canvas's rounded down to size_multiple, else the
        pipeline default (1024² for the real models)."""
        m = self.size_multiple
        for side, value in (("height", request.height), ("width", request.width)):
            if value is not None and (value % m or value < m):
                raise ValueError(f"request.{side}={value} must be a positive multiple of {m} for this checkpoint")
        if canvas is None:
            default = self.draw_size
            return request.height or default, request.width or default
        w, h = canvas.size
        return request.height or (h // m) * m, request.width or (w // m) * m


CANVAS_CONFIG = "clvr_canvas.json"


def canvas_config(folder: Path) -> dict:
    """Optional ``clvr_canvas.json`` in a checkpoint folder: ``{"draw_size": 64, "canvas_size": 256}``,
    optionally with ``"guidance"``: the base CFG scale measured best for this checkpoint."""
    path = folder / CANVAS_CONFIG
    if not path.is_file():
        return {}
    sizes = json.loads(path.read_text())
    unknown = set(sizes) - {"draw_size", "canvas_size", "guidance"}
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {sorted(unknown)}; expected draw_size, canvas_size, guidance")
    return sizes


def prompt_max_length(pipe) -> int:
    """Tokens every prompt is padded/truncated to: 512, or fewer when the checkpoint's tokenizer says so.
    Trainers must use the same value, since padded text tokens take part in joint attention."""
    return min(MAX_SEQUENCE_LENGTH, pipe.tokenizer.model_max_length)


def fit_reference(image: Image.Image) -> Image.Image:
    """RGB, both sides ≥ 64 px (upscaled, aspect kept) and area ≤ 1024² (downscaled), as klein needs."""
    w, h = image.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError(f"reference {w}×{h} has an aspect ratio above {MAX_ASPECT:g}:1, which FLUX.2 refuses")
    image = image.convert("RGB")
    if min(w, h) < MIN_SIDE:  # aspect ≤ 8 keeps the upscaled area far below 1024²
        scale = MIN_SIDE / min(w, h)
        return image.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))), Image.Resampling.BICUBIC)
    if w * h > MAX_AREA:
        scale = (MAX_AREA / (w * h)) ** 0.5
        return image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
    return image


def scale_region(region: Region, src: tuple[int, int], dst: tuple[int, int]) -> Region:
    """Map a pixel box on a ``src``-sized canvas (w, h) to the ``dst``-sized one, checking it is inside."""
    sw, sh = src
    if not (0 <= region.x0 < region.x1 <= sw and 0 <= region.y0 < region.y1 <= sh):
        raise ValueError(f"region {region.model_dump()} is empty or outside the {sw}×{sh} canvas")
    fx, fy = dst[0] / sw, dst[1] / sh
    return Region(
        x0=int(region.x0 * fx), y0=int(region.y0 * fy), x1=max(int(region.x1 * fx), int(region.x0 * fx) + 1),
        y1=max(int(region.y1 * fy), int(region.y0 * fy) + 1),
    )


def check_region(region: Region, size: tuple[int, int]) -> None:
    w, h = size
    if not (0 <= region.x0 < region.x1 <= w and 0 <= region.y0 < region.y1 <= h):
        raise ValueError(f"region {region.model_dump()} is empty or outside the {w}×{h} canvas")


def region_draw_size(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """(height, width) to draw a ``width``×``height`` region at: the area of a ``side``² draw with the
    region's aspect ratio, each side rounded to a multiple of ``multiple`` (at least one multiple)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"region {width}×{height} is empty")
    root = (width / height) ** 0.5
    return tuple(max(multiple, round(side * f / multiple) * multiple) for f in (1 / root, root))


def paste_region(canvas: Image.Image, tile: Image.Image, region: Region) -> Image.Image:
    """``canvas`` with ``tile`` resized (Lanczos) into ``region``; the canvas itself is not changed."""
    out = canvas.convert("RGB").copy()
    box = (region.x0, region.y0, region.x1, region.y1)
    out.paste(tile.convert("RGB").resize((region.x1 - region.x0, region.y1 - region.y0), Image.Resampling.LANCZOS), box)
    return out


def region_mask(region: Region, size: tuple[int, int]) -> Image.Image:
    """An L-mode mask of ``size`` (w, h): white (repaint) inside the box, black (keep) elsewhere."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (region.x0, region.y0, region.x1, region.y1))
    return mask


# A checkpoint that stacks other hidden states says so in its text_encoder/config.json under this key;
# the executor and every trainer read it from there (one source), so training and serving agree.
OUT_LAYERS_KEY = "clvr_text_encoder_out_layers"


def text_encoder_out_layers(pipe) -> tuple[int, ...]:
    """The text-encoder hidden states stacked into the prompt embedding: the folder's, else (9, 18, 27)."""
    layers = getattr(pipe.text_encoder.config, OUT_LAYERS_KEY, None)
    return tuple(int(k) for k in layers) if layers else TEXT_ENCODER_OUT_LAYERS


def _check_out_layers(pipe, source: str) -> None:
    te, tr = pipe.text_encoder.config, pipe.transformer.config
    layers = text_encoder_out_layers(pipe)
    expected = len(layers) * te.hidden_size
    if te.num_hidden_layers < max(layers) or tr.joint_attention_dim != expected:
        raise CheckpointError(
            f"{source}: FLUX.2 [klein] stacks text-encoder hidden states {layers}, so it needs "
            f"≥ {max(layers)} text layers and transformer joint_attention_dim == "
            f"{len(layers)} × text hidden size ({expected}); this checkpoint has "
            f"{te.num_hidden_layers} layers and joint_attention_dim {tr.joint_attention_dim}"
        )


def _local_folder(model: str) -> Optional[Path]:
    """The folder ``model`` names, or None for a hub id (``owner/name``); never a download."""
    try:
        return model_source(model, "FLUX.2 [klein] model")
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None


def _check_folder(folder: Path) -> dict:
    """Read model_index.json and check each component is there with safetensors weights."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{folder} has no model_index.json; expected a diffusers FLUX.2 [klein] folder "
            "(pipe.save_pretrained(DIR), or a download of black-forest-labs/FLUX.2-klein-4B)"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path} is not valid JSON: {exc}") from exc
    problems = []
    for name in _WEIGHTED_COMPONENTS + _CONFIG_COMPONENTS:
        sub = folder / name
        if name not in index:
            problems.append(f"model_index.json has no {name!r} entry")
        elif not sub.is_dir():
            problems.append(f"{name}/ is missing")
        elif name in _WEIGHTED_COMPONENTS and not any(sub.glob("*.safetensors")):
            problems.append(f"{name}/ has no *.safetensors weights (only safetensors are loaded)")
    if problems:
        raise CheckpointError(f"{folder} is not a complete FLUX.2 [klein] checkpoint: " + "; ".join(problems))
    return index


def _hub_index(model: str) -> dict:
    """model_index.json of a hub id, from the local cache when HF_HUB_OFFLINE is set."""
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json")).read_text())
    except (OSError, ValueError) as exc:  # not cached offline, no such repo, or an invalid id
        raise CheckpointError(
            f"could not get model_index.json for hub id {model!r} ({type(exc).__name__}: {exc}); "
            "pass a local diffusers folder, or make the id available in the HF cache"
        ) from exc
