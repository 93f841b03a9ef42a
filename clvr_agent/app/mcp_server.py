"""``clvr mcp``: the CLVR loop as a Model Context Protocol server (the official ``mcp`` SDK).

One tool, ``generate_image(prompt, seed, max_iterations)``. Its result holds the final image as an
image content block, a one-line text (status, image, iterations, unmet constraints) and, as
structured content, the run summary (:class:`~clvr_agent.app.agent_tool.RunSummary`). While it runs,
the loop's progress events become MCP progress notifications (when the client sent a progress
token); a client's cancellation stops the run after the executor's current denoising step. The
backend is chosen when the server starts and its models load once, before the first request.
Runs are served one at a time: they share the models, which are not re-entrant.
"""

# No ``from __future__ import annotations``: FastMCP reads the tool's signature, whose annotations
# name classes imported inside build_server.

import asyncio
import base64
import sys
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Optional

from clvr_agent.app.agent_tool import RunSummary, final_png, run_summary, summarize_result

if TYPE_CHECKING:
    from mcp.server.fastmcp import FastMCP

TOOL_DESCRIPTION = (
    "Draw an image that satisfies a detailed prompt: a vision-language controller plans it into a "
    "checklist, a diffusion model draws it, the controller verifies every item and corrects the image "
    "until it satisfies the prompt or the budget runs out. Returns the image, a one-line status and a "
    "summary of every step.")
CANCEL_GRACE_S = 120.0  # how long a cancelled run may take to reach its next denoising step


def log(message: str) -> None:
    """One line on stderr (on stdio, stdout is the protocol)."""
    print(f"clvr mcp: {message}", file=sys.stderr, flush=True)


def describe_event(event: dict) -> str:
    """A progress message for one of the loop's ``custom`` stream events."""
    kind = event.get("event")
    if kind == "denoise":
        return f"step {event['step']}: denoising {event['i']}/{event['of']}"
    if kind == "iteration":
        return f"iteration {event['iteration']}: score {event['score']:.2f}"
    if kind == "node_start":
        return f"{event['node']}" + (f" (step {event['step']})" if "step" in event else "")
    if kind == "stop":
        return f"stop: {event['status']} ({event['reason']})"
    return str(kind)


class ClvrMcpService:
    """Runs the tool's requests on one CLVR runnable, one at a time."""

    def __init__(self, runnable: Any, *, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        self.runnable = runnable
        self.cancel_grace_s = cancel_grace_s
        self._one_at_a_time = asyncio.Lock()

    async def generate(self, prompt: str, seed: Optional[int], max_iterations: Optional[int], ctx: Any):
        from mcp.types import CallToolResult, ImageContent, TextContent

        inputs: dict = {"prompt": prompt}
        if seed is not None:
            inputs["seed"] = seed
        if max_iterations is not None:
            inputs["max_iterations"] = max_iterations
        meta = ctx.request_context.meta
        token = meta.progressToken if meta is not None else None
        async with self._one_at_a_time:
            result = await self._run(inputs, ctx if token is not None else None)
        summary = run_summary(result)
        png = final_png(result)
        content: list = [TextContent(type="text", text=summarize_result(result))]
        if png is not None:
            content.insert(0, ImageContent(type="image", data=base64.b64encode(png).decode("ascii"),
                                           mimeType="image/png"))
        return CallToolResult(content=content, structuredContent=summary.model_dump(mode="json"),
                              isError=summary.status == "failed")

    async def _run(self, inputs: dict, progress_ctx: Any) -> dict:
        """Stream one run; on cancellation stop it and wait until it has stopped (the models are
        free again for the next request), then let the cancellation through."""
        run_id = uuid.uuid4()
        seen = {"events": 0, "denoise": 0, "quiet": progress_ctx is None}
        t0 = time.perf_counter()

        async def consume() -> dict:
            values: dict = {}
            async for mode, chunk in self.runnable.astream(inputs, {"run_id": run_id},
                                                           stream_mode=["updates", "custom", "values"]):
                if mode == "values":
                    values = chunk
                elif mode == "custom":
                    seen["events"] += 1
                    seen["denoise"] += chunk.get("event") == "denoise"
                    if not seen["quiet"]:
                        await progress_ctx.report_progress(seen["events"], None, describe_event(chunk))
            return values

        task = asyncio.create_task(consume())
        try:
            values = await asyncio.shield(task)
        except asyncio.CancelledError:
            await self._stop(task, run_id, seen)
            log(f"run {run_id} cancelled by the client; stopped after {seen['denoise']} denoising step(s) "
                 f"in {time.perf_counter() - t0:.2f}s")
            raise
        log(f"run {run_id}: {values.get('status')} after {values.get('iterations')} iteration(s), "
             f"{seen['denoise']} denoising step(s) in {time.perf_counter() - t0:.2f}s")
        return values

    async def _stop(self, task: asyncio.Task, run_id: uuid.UUID, seen: dict) -> None:
        import anyio

        seen["quiet"] = True  # the request is over: no more progress for it
        while not self.runnable.cancel(run_id) and not task.done():
            await asyncio.wait({task}, timeout=0.05)  # the run has not registered yet: it is starting
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({task}, timeout=self.cancel_grace_s)
            if not done:  # a model call that never checks the flag: drop the stream
                task.cancel()
                await asyncio.wait({task})
        if task.done() and not task.cancelled() and task.exception() is not None:
            log(f"run {run_id} raised while stopping: {task.exception()!r}")


def build_server(runnable: Any, *, host: str = "127.0.0.1", port: int = 8000) -> "FastMCP":
    """The FastMCP server with the ``generate_image`` tool bound to ``runnable``."""
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.types import CallToolResult, ToolAnnotations
    from pydantic import Field

    service = ClvrMcpService(runnable)
    server = FastMCP("clvr", instructions="Closed-loop verified text-to-image: call generate_image with a "
                     "detailed prompt.", host=host, port=port, log_level="WARNING")

    @server.tool(name="generate_image", title="Generate a verified image", description=TOOL_DESCRIPTION,
                 annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=False))
    async def generate_image(
        prompt: Annotated[str, Field(min_length=1, max_length=2000, description=(
            "What the image must show; every object, count, colour and relation."))],
        ctx: Context,
        seed: Annotated[Optional[int], Field(ge=0, lt=2**63, description="Seed for a reproducible image.")] = None,
        max_iterations: Annotated[Optional[int], Field(ge=1, le=64, description=(
            "Most generate/verify rounds to spend; omit for the server's default."))] = None,
    ) -> Annotated[CallToolResult, RunSummary]:
        return await service.generate(prompt, seed, max_iterations, ctx)

    return server
