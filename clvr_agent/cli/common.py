"""What every ``clvr`` command shares: the one-line error, shards, devices and dtypes, model sources,
and the backend/model flags of the commands that run models.

Nothing heavy is imported here: torch only when a real model's device must be resolved.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)

REAL_EXECUTORS = ("flux2-klein", "clvr-mini")


def fail(message: str) -> None:
    """One line on stderr, exit code 2 (the message is shown verbatim: brackets are not markup)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        fail(f"{flag} {text!r}: expected K/N, e.g. 0/4 for the first of four shards")
    if not 0 <= k < n:
        fail(f"{flag} {text!r}: need 0 <= K < N, e.g. 0/4 for the first of four shards")
    return k, n


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(device: str, flag: str = "--device") -> str:
    """``auto`` is cuda when a CUDA device is there, else cpu; an unavailable cuda is an error, never a switch."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        fail(f"{flag} {device}: no CUDA device is available; pass {flag} cpu (or auto)")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is bfloat16 on an accelerator and float32 on the CPU; anything else is passed as given."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return dtype


def check_model_source(flag: str, value: str) -> None:
    """A path-like model argument must be an existing folder (checked before hours of work); else a hub id."""
    from clvr_agent.tools.loading import model_source

    try:
        model_source(value, flag)
    except FileNotFoundError as exc:
        fail(str(exc))


@dataclass
class ModelChoice:
    """The backends a command runs, with their options, from the shared flags (validated)."""

    backend: str
    controller: Optional[str]
    executor_options: dict = field(default_factory=dict)
    controller_options: dict = field(default_factory=dict)
    request: dict = field(default_factory=dict)  # steps, guidance, height, width (None = the checkpoint's)


def _opt(default, help: str, annotation=str) -> tuple:
    return (annotation, typer.Option(default, help=help))


_MODEL_FLAGS = {
    "backend": _opt("shapeworld", "Executor: shapeworld (embedded), flux2-klein, clvr-mini."),
    "controller": _opt(None, "Controller: shapeworld, qwen3-vl, chat-model (default: the backend's).", Optional[str]),
    "model": _opt(None, "Executor weights: hub id or local folder (flux2-klein, clvr-mini).", Optional[str]),
    "vlm": _opt(None, "Qwen3-VL weights: hub id, local folder or shipped name (clvr-mini-vlm).", Optional[str]),
    "base_url": _opt(None, "OpenAI-compatible server for --controller chat-model.", Optional[str]),
    "model_name": _opt(None, "Model name on that server.", Optional[str]),
    "dtype": _opt("auto", "torch dtype for real models: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32."),
    "device": _opt("auto", "torch device for real models: auto (cuda when available, else cpu), cuda, cuda:1, cpu."),
    "offload": _opt(False, "enable_model_cpu_offload for the executor.", bool),
    "height": _opt(None, "Canvas height in pixels (default: the checkpoint's).", Optional[int]),
    "width": _opt(None, "Canvas width in pixels (default: the checkpoint's).", Optional[int]),
    "steps": _opt(None, "Denoising steps (default: the checkpoint's).", Optional[int]),
    "guidance": _opt(None, "Guidance scale (default: the checkpoint's).", Optional[float]),
    "region_draws": _opt(True, "ShapeWorld controller: draw a missing object into a clear tile once edits fail "
                               "(--no-region-draws: the loop must edit or redraw).", bool),
}


def model_choice(backend: str, controller: Optional[str] = None, model: Optional[str] = None,
                 vlm: Optional[str] = None, base_url: Optional[str] = None, model_name: Optional[str] = None,
                 dtype: str = "auto", device: str = "auto", offload: bool = False, height: Optional[int] = None,
                 width: Optional[int] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, region_draws: bool = True) -> ModelChoice:
    """Check the shared flags together; a real model's ``auto`` device and dtype are settled here, once."""
    from clvr_agent.tools.registry import controller_names, executor_names

    if backend not in executor_names():
        fail(f"unknown backend {backend!r}; known: {', '.join(executor_names())}")
    if controller is not None and controller not in controller_names():
        fail(f"unknown controller {controller!r}; known: {', '.join(controller_names())}")
    if (height is None) != (width is None):
        fail("give both --height and --width, or neither")
    real = backend in REAL_EXECUTORS or controller == "qwen3-vl"
    if real:
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
    ex_opts: dict = {}
    if backend in REAL_EXECUTORS:
        if backend == "flux2-klein" and not model:
            fail("--backend flux2-klein needs --model (a hub id or a local diffusers folder)")
        ex_opts = {"torch_dtype": dtype, "device": device, "offload": offload}
        if model:
            check_model_source("--model", model)
            ex_opts["model"] = model
    elif model:
        fail(f"--model is not used by --backend {backend}")
    ctl_opts: dict = {}
    if controller == "qwen3-vl":
        if not vlm:
            fail("--controller qwen3-vl needs --vlm (a hub id, a local folder or clvr-mini-vlm)")
        ctl_opts = {"vlm": vlm, "torch_dtype": dtype, "device": device}
    elif controller == "chat-model":
        if not base_url:
            fail("--controller chat-model needs --base-url (an OpenAI-compatible server) and --model-name")
        ctl_opts = {"base_url": base_url, "model_name": model_name}
    elif vlm:
        fail("--vlm is only used by --controller qwen3-vl")
    ctl_opts.update(shapeworld_controller_options(backend, controller, region_draws))
    request = dict(steps=steps, guidance=guidance, height=height, width=width)
    return ModelChoice(backend, controller, ex_opts, ctl_opts, request)


def shapeworld_controller_options(backend: str, controller: Optional[str], region_draws: bool) -> dict:
    """``{"region_draws": False}`` for ``--no-region-draws`` (only the ShapeWorld controller has them), else ``{}``."""
    from clvr_agent.tools.registry import default_controller

    if region_draws:
        return {}
    if (controller or default_controller(backend)) != "shapeworld":
        fail(f"--no-region-draws is an option of the ShapeWorld controller, not of {controller or default_controller(backend)}")
    return {"region_draws": False}


def with_model_options(fn: Callable) -> Callable:
    """Give a command the shared backend/model flags; it receives them checked, as ``models: ModelChoice``."""
    sig = inspect.signature(fn, eval_str=True)  # typer reads the signature and annotations set below
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
              for name, (annotation, option) in _MODEL_FLAGS.items()]
    params = [p for p in sig.parameters.values() if p.name != "models"] + shared

    def command(**kwargs):
        flags = {name: kwargs.pop(name) for name in _MODEL_FLAGS}
        return fn(models=model_choice(**flags), **kwargs)

    command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    command.__signature__ = sig.replace(parameters=params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
