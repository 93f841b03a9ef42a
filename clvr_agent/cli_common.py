"""Pieces every ``clvr`` subcommand shares: the one-line error and backend option checks."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def fail(message: str) -> None:
    """One line on stderr, exit code 2 (the message is shown verbatim: brackets are not markup)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def executor_options(backend: str, model, dtype, device, offload) -> dict:
    if backend in ("flux2-klein", "clvr-mini"):
        if backend == "flux2-klein" and not model:
            fail("--backend flux2-klein needs --model (a hub id or a local diffusers folder)")
        opts = {"torch_dtype": dtype, "device": device, "offload": offload}
        if model:
            opts["model"] = model
        return opts
    if model:
        fail(f"--model is not used by --backend {backend}")
    return {}


def controller_options(controller: Optional[str], vlm, base_url, model_name, dtype, device) -> dict:
    if controller == "qwen3-vl":
        if not vlm:
            fail("--controller qwen3-vl needs --vlm (a hub id or a local folder)")
        return {"vlm": vlm, "torch_dtype": dtype, "device": device}
    if controller == "chat-model":
        if not base_url:
            fail("--controller chat-model needs --base-url (an OpenAI-compatible server) and --model-name")
        return {"base_url": base_url, "model_name": model_name}
    return {}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def check_device(backend: str, device: str, dtype: str) -> tuple[str, str]:
    """Real models asked onto a CUDA device that is not there: an error, not a silent switch.
    The one exception is clvr-mini's default (``--device cuda`` unchanged), documented to run on the CPU."""
    if backend in ("flux2-klein", "clvr-mini") and device.startswith("cuda") and not cuda_available():
        if backend == "clvr-mini" and device == "cuda":
            return "cpu", "float32" if dtype == "bfloat16" else dtype
        fail(f"--device {device}: no CUDA device is available; pass --device cpu")
    return device, dtype
