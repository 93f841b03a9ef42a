"""Backends by name, each built once per process and shared by every run.

``get_executor("shapeworld")`` returns the same object on every call with the same options, so a
second run in the same process loads nothing. Factories import their heavy dependencies lazily.
This module is a :class:`~clvr_agent.protocols.Backends`: the app hands it to ``build_graph``.
A new backend is one factory here (or ``register_executor`` from your own package).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

from clvr_agent.errors import MissingDependencyError, UnknownBackendError
from clvr_agent.protocols import Controller, Executor


# The pip extra each shipped backend's imports come from (shapeworld needs none).
_EXTRAS = {"flux2-klein": "models", "clvr-mini": "models", "qwen3-vl": "models", "chat-model": "openai"}


# Which controller a backend pairs with when none is named. A VLM controller works with any
# executor; the ShapeWorld controller judges anything that draws ShapeWorld scenes.
DEFAULT_CONTROLLER = {"shapeworld": "shapeworld", "clvr-mini": "shapeworld", "flux2-klein": "qwen3-vl"}


def default_controller(backend: str) -> str:
    return DEFAULT_CONTROLLER.get(backend, "shapeworld")


_EXECUTORS: dict[str, Callable[..., Executor]] = {}
_CONTROLLERS: dict[str, Callable[..., Controller]] = {}
_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
# How many times each backend was actually constructed in this process (the `loads` bench reads it).
LOAD_COUNTS: dict[str, int] = {}


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    _EXECUTORS[name] = factory


def executor_names() -> list[str]:
    _register_builtins()
    return sorted(_EXECUTORS)


def controller_names() -> list[str]:
    _register_builtins()
    return sorted(_CONTROLLERS)


def _key(kind: str, name: str, options: dict) -> tuple:
    return (kind, name, json.dumps(options, sort_keys=True, default=repr))


def check_name(kind: str, name: str) -> None:
    """UnknownBackendError listing the known names unless ``name`` is a registered ``kind`` backend."""
    _register_builtins()
    table = _EXECUTORS if kind == "executor" else _CONTROLLERS
    if name not in table:
        raise UnknownBackendError(f"unknown {kind} backend {name!r}; known: {', '.join(sorted(table))}")


def _get(kind: str, table: dict, name: str, options: dict):
    check_name(kind, name)
    key = _key(kind, name, options)
    with _LOCK:
        if key not in _CACHE:
            try:
                _CACHE[key] = table[name](**options)
            except ModuleNotFoundError as exc:
                extra = _EXTRAS.get(name, "models")
                raise MissingDependencyError(
                    f"{kind} backend {name!r} needs {exc.name!r}, which is not installed: "
                    f"pip install 'clvr-agent[{extra}]'") from exc
            LOAD_COUNTS[f"{kind}:{name}"] = LOAD_COUNTS.get(f"{kind}:{name}", 0) + 1
        return _CACHE[key]


def get_executor(name: str, **options) -> Executor:
    return _get("executor", _EXECUTORS, name, options)


def get_controller(name: str, **options) -> Controller:
    return _get("controller", _CONTROLLERS, name, options)


def clear_cache() -> None:
    """Drop every loaded backend (tests use it to count loads from zero)."""
    with _LOCK:
        _CACHE.clear()
        LOAD_COUNTS.clear()


_BUILTINS_DONE = False


def _register_builtins() -> None:
    """Register the shipped backends; each factory imports its module only when first used."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True

    def shapeworld_executor(**kw):
        from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor

        return ShapeWorldExecutor(**kw)

    def shapeworld_controller(**kw):
        from clvr_agent.tools.shapeworld.controller import ShapeWorldController

        return ShapeWorldController(**kw)

    def flux2_klein_executor(**kw):
        from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

        return Flux2KleinExecutor.from_pretrained(**kw)

    def clvr_mini_executor(**kw):
        from clvr_agent.tools.flux2_klein import Flux2KleinExecutor, clvr_mini_path

        kw.setdefault("model", str(clvr_mini_path()))
        kw.setdefault("torch_dtype", "float32")  # a 10 MB model: bfloat16 only costs accuracy on a CPU
        return Flux2KleinExecutor.from_pretrained(**kw)

    def chat_model_controller(**kw):
        from clvr_agent.tools.chat_controller import ChatModelController

        return ChatModelController.from_spec(**kw)

    def qwen3_vl_controller(**kw):
        from clvr_agent.tools.qwen3_vl import load_qwen3_vl_controller

        return load_qwen3_vl_controller(**kw)

    _EXECUTORS.setdefault("shapeworld", shapeworld_executor)
    _EXECUTORS.setdefault("flux2-klein", flux2_klein_executor)
    _EXECUTORS.setdefault("clvr-mini", clvr_mini_executor)
    _CONTROLLERS.setdefault("shapeworld", shapeworld_controller)
    _CONTROLLERS.setdefault("chat-model", chat_model_controller)
    _CONTROLLERS.setdefault("qwen3-vl", qwen3_vl_controller)
