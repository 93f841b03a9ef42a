"""clvr-agent: Closed-Loop Verified Reasoning for text-to-image, as a LangGraph plugin.

    from clvr_agent import create_clvr
    result = create_clvr("shapeworld").invoke({"prompt": "a photo of two red circles"})

This package is also the core (types, state, protocols, errors, store, seeds). The public names
below come from the app room on first access, so importing the core imports nothing else, and no
import loads a model: backends are built on first use and shared per process.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "create_clvr": "clvr_agent.app.api", "clvr_tool": "clvr_agent.app.api", "build_context": "clvr_agent.app.api",
    "ClvrRunnable": "clvr_agent.app.api", "ClvrContext": "clvr_agent.state", "Settings": "clvr_agent.state",
    **{name: "clvr_agent.types" for name in (
        "TRAJECTORY_SCHEMA_VERSION", "Correction", "ExecutorRequest", "ImageRef", "PassiveCheck", "Plan", "Step",
        "Trajectory", "Verdict", "trajectory_json_schema")},
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clvr_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
