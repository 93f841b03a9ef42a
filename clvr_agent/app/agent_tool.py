"""CLVR as a tool for a larger agent: a LangChain ``BaseTool`` and the run summary it (and the MCP
server) hands back.

The agent's model reads one compact line (status, image, iterations, unmet constraints). With
``response_format="content_and_artifact"`` the final image (path and base64 PNG) and the trajectory
summary ride along as the tool message's artifact, for the program around the agent; with
``image_in_message=True`` the image itself goes into the tool message as a standard image content
block, so a multimodal chat model sees what was drawn.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal, Optional

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TOOL_NAME = "clvr_generate_image"
TOOL_DESCRIPTION = (
    "Generate an image that satisfies a detailed prompt by planning, drawing, verifying and correcting "
    "it in a loop. Returns the status, the image, the iterations used and any unmet constraints.")


class ClvrToolInput(BaseModel):
    """What an LLM may send. Strings that are plain integers ("3") are accepted, as pydantic
    coerces them; booleans, fractions and out-of-range numbers are refused with a readable message."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000,
                        description="What the image must show; every object, count, colour and relation.")
    seed: Optional[int] = Field(None, ge=0, description="Seed for a reproducible image (an integer ≥ 0).")
    max_iterations: Optional[int] = Field(
        None, ge=1, le=64, description="Most generate/verify rounds to spend (1-64); omit for the default.")

    @field_validator("seed", "max_iterations", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be an integer, not true/false")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_fits(cls, value: Optional[int]) -> Optional[int]:  # checked here, not in the schema: some
        if value is not None and value >= 2**63:                    # providers refuse huge schema numbers
            raise ValueError("must be below 2**63")
        return value

    @field_validator("prompt")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value


def argument_errors(exc: ValidationError) -> str:
    """Every bad argument on one line, for the agent's model to read and fix its call."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "arguments"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r:.60})")
    return f"invalid arguments for {TOOL_NAME}: " + "; ".join(parts)


class StepSummary(BaseModel):
    index: int
    iteration: int
    mode: str
    instruction: str
    accepted: bool
    score: Optional[float] = None
    nfe: int = 0
    error: Optional[str] = None


class RunSummary(BaseModel):
    """The trajectory in brief: what an agent or an MCP client gets back besides the image."""

    status: str
    stop_reason: str = ""
    prompt: str = ""
    seed: Optional[int] = None
    backend: str = ""
    controller: str = ""
    iterations: int = 0
    final_image: Optional[str] = Field(None, description="Path of the final image on the machine that drew it.")
    constraints: list[str] = Field(default_factory=list, description="The plan's checklist.")
    unmet: list[str] = Field(default_factory=list, description="Checklist items the final image does not satisfy.")
    total_nfe: int = 0
    steps: list[StepSummary] = Field(default_factory=list)


def _unmet(traj: dict, final: Optional[str]) -> list[str]:
    for s in traj.get("steps", []):
        if s.get("verdict") and s.get("canvas") and s["canvas"]["path"] == final:
            return [c["detail"] or c["id"] for c in s["verdict"]["constraints"] if not c["satisfied"]]
    return []


def run_summary(result: dict) -> RunSummary:
    """The summary of a finished run's output (``invoke``'s result)."""
    traj = result.get("trajectory") or {}
    final = result.get("final_image")
    plan = traj.get("plan") or {}
    steps = [StepSummary(index=s["index"], iteration=s["iteration"], mode=s["request"]["mode"],
                         instruction=s["instruction"], accepted=s["accepted"], nfe=s.get("nfe", 0),
                         score=(s.get("verdict") or {}).get("score"), error=s.get("error"))
             for s in traj.get("steps", [])]
    return RunSummary(
        status=result.get("status") or traj.get("status", "failed"),
        stop_reason=result.get("stop_reason") or traj.get("stop_reason", ""),
        prompt=traj.get("prompt", ""), seed=traj.get("seed"), backend=traj.get("backend", ""),
        controller=traj.get("controller", ""), iterations=result.get("iterations") or 0, final_image=final,
        constraints=[c["text"] for c in plan.get("constraints", [])], unmet=_unmet(traj, final),
        total_nfe=sum(s.nfe for s in steps), steps=steps)


def summarize_result(result: dict) -> str:
    """One compact line for an agent: status, final image, iterations, unmet constraints."""
    unmet = _unmet(result.get("trajectory") or {}, result.get("final_image"))
    text = f"status={result.get('status')} image={result.get('final_image')} iterations={result.get('iterations')}"
    return text + (f" unmet: {'; '.join(unmet)}" if unmet else "")


def final_png(result: dict) -> Optional[bytes]:
    """The final image's PNG bytes, or None when the run drew nothing."""
    path = result.get("final_image")
    return Path(path).read_bytes() if path else None


def _tool_output(result: dict, response_format: str, image_in_message: bool) -> Any:
    text = summarize_result(result)
    png = final_png(result)
    b64 = base64.b64encode(png).decode("ascii") if png is not None else None
    content: Any = text
    if image_in_message and b64 is not None:
        from langchain_core.messages.content import create_image_block, create_text_block

        content = [create_text_block(text), create_image_block(base64=b64, mime_type="image/png")]
    if response_format == "content":
        return content
    image = {"path": result.get("final_image"), "mime_type": "image/png", "base64": b64} if b64 else None
    return content, {"image": image, "summary": run_summary(result).model_dump(mode="json")}


def clvr_tool(
    runnable: Any = None,
    *,
    response_format: Literal["content", "content_and_artifact"] = "content",
    image_in_message: bool = False,
    **settings: Any,
) -> BaseTool:
    """A LangChain tool that draws an image with the CLVR loop.

    ``runnable`` is a :func:`~clvr_agent.create_clvr` runnable (else one is built from ``settings``).
    ``response_format="content_and_artifact"``: the ToolMessage's ``artifact`` holds
    ``{"image": {"path", "mime_type", "base64"}, "summary": RunSummary}``. ``image_in_message=True``:
    its content is a text block plus an image block, for a multimodal chat model.
    """
    if response_format not in ("content", "content_and_artifact"):
        raise ValueError(f"response_format must be 'content' or 'content_and_artifact', got {response_format!r}")
    if runnable is None:
        from clvr_agent.app.api import create_clvr

        runnable = create_clvr(**settings)
    elif settings:
        raise ValueError(f"give settings to create_clvr, not with a runnable: {', '.join(settings)}")

    def _input(prompt: str, seed: Optional[int], max_iterations: Optional[int]) -> dict:
        inp: dict = {"prompt": prompt}
        if seed is not None:
            inp["seed"] = seed
        if max_iterations is not None:
            inp["max_iterations"] = max_iterations
        return inp

    def draw(prompt: str, seed: Optional[int] = None, max_iterations: Optional[int] = None) -> Any:
        return _tool_output(runnable.invoke(_input(prompt, seed, max_iterations)), response_format, image_in_message)

    async def adraw(prompt: str, seed: Optional[int] = None, max_iterations: Optional[int] = None) -> Any:
        result = await runnable.ainvoke(_input(prompt, seed, max_iterations))
        return _tool_output(result, response_format, image_in_message)

    return StructuredTool.from_function(
        func=draw, coroutine=adraw, name=TOOL_NAME, args_schema=ClvrToolInput, description=TOOL_DESCRIPTION,
        response_format=response_format, handle_validation_error=argument_errors,
    )
