"""clvr-agent: Closed-Loop Verified Reasoning for text-to-image, as a LangGraph plugin.

    from clvr_agent import create_clvr
    result = create_clvr("shapeworld").invoke({"prompt": "a photo of two red circles"})

Importing this package loads no model; backends are built on first use and shared per process.
"""

from clvr_agent.api import ClvrRunnable, build_context, clvr_tool, create_clvr
from clvr_agent.state import ClvrContext, Settings
from clvr_agent.types import (
    TRAJECTORY_SCHEMA_VERSION,
    Correction,
    ExecutorRequest,
    ImageRef,
    PassiveCheck,
    Plan,
    Step,
    Trajectory,
    Verdict,
    trajectory_json_schema,
)

__all__ = [
    "create_clvr", "clvr_tool", "build_context", "ClvrRunnable", "ClvrContext", "Settings",
    "Trajectory", "Step", "Plan", "Verdict", "PassiveCheck", "Correction", "ExecutorRequest",
    "ImageRef", "TRAJECTORY_SCHEMA_VERSION", "trajectory_json_schema",
]
__version__ = "0.1.0"
