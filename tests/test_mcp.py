"""`clvr mcp` driven by the official MCP client over stdio and streamable HTTP, and loaded into a
LangChain agent through langchain-mcp-adapters. Every server is a real subprocess."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from PIL import Image

mcp = pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters, types  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import McpError  # noqa: E402

PROMPT = "a photo of two red circles left of a blue square"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SERVER = [sys.executable, "-m", "clvr_agent.cli", "mcp"]
KLEIN_STEPS = 20


def _klein_args(model_dir: Path) -> list[str]:
    """The real FLUX.2 [klein] executor on a tiny checkpoint: slow enough (many small denoising
    steps) to be cancelled mid-run, judged by the ShapeWorld controller."""
    return ["--backend", "flux2-klein", "--model", str(model_dir), "--controller", "shapeworld",
            "--device", "cpu", "--dtype", "float32", "--steps", str(KLEIN_STEPS), "--height", "64",
            "--width", "64", "--max-iterations", "1"]


class Notifications:
    """Collects the server's progress notifications (the client's message handler)."""

    def __init__(self) -> None:
        self.progress: list[types.ProgressNotificationParams] = []
        self.first_denoise = anyio.Event()

    async def __call__(self, message) -> None:
        if isinstance(message, types.ServerNotification) and isinstance(message.root, types.ProgressNotification):
            self.progress.append(message.root.params)
            if "denoising" in (message.root.params.message or ""):
                self.first_denoise.set()


def _image(result: types.CallToolResult) -> Image.Image:
    blocks = [c for c in result.content if isinstance(c, types.ImageContent)]
    assert len(blocks) == 1 and blocks[0].mimeType == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(blocks[0].data)))
    assert image.format == "PNG"
    return image


def _text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def _progress_sink(progress: float, total: float | None, message: str | None) -> None:
    """Passing a callback is what makes the SDK client send a progress token."""


async def _cancel_mid_run_then_run_again(session: ClientSession, notes: Notifications) -> types.CallToolResult:
    """Cancel a call at its first denoising step, then make another call on the same server."""
    outcome: dict = {}

    async def first_call() -> None:
        try:
            outcome["result"] = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": 1},
                                                        progress_callback=_progress_sink)
        except McpError as exc:
            outcome["error"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_call)
        with anyio.fail_after(120):
            await notes.first_denoise.wait()
        token = notes.progress[-1].progressToken  # this client uses the request id as the token
        await session.send_notification(types.ClientNotification(types.CancelledNotification(
            params=types.CancelledNotificationParams(requestId=token, reason="the user changed their mind"))))
    assert "result" not in outcome and "cancelled" in str(outcome["error"]).lower()
    with anyio.fail_after(120):  # the next call waits for the cancelled run to stop, then runs whole
        again = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": 2})
    assert not again.isError and again.structuredContent["seed"] == 2
    assert again.structuredContent["total_nfe"] >= KLEIN_STEPS  # it ran every denoising step
    return again


def _check_cancel_log(log: str) -> None:
    stopped = re.findall(r"cancelled by the client; stopped after (\d+) denoising step", log)
    assert len(stopped) == 1, log[-3000:]
    assert int(stopped[0]) < KLEIN_STEPS, log[-3000:]  # the run stopped mid-generate, not at its end


def test_stdio_lists_the_tool_and_returns_an_image_with_progress(tmp_path):
    async def main() -> None:
        notes = Notifications()
        params = StdioServerParameters(command=SERVER[0], args=SERVER[1:] + ["--max-iterations", "4"], env=ENV)
        with open(tmp_path / "server.log", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), \
                    ClientSession(read, write, message_handler=notes) as session:
                await session.initialize()
                (tool,) = (await session.list_tools()).tools
                assert tool.name == "generate_image"
                assert set(tool.inputSchema["properties"]) == {"prompt", "seed", "max_iterations"}
                assert tool.inputSchema["required"] == ["prompt"]
                assert {"status", "unmet", "steps", "total_nfe"} <= set(tool.outputSchema["properties"])

                result = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": 3},
                                                 progress_callback=_progress_sink)
                assert not result.isError
                assert _image(result).size == (256, 256)
                summary = result.structuredContent
                assert summary["seed"] == 3 and summary["backend"] == "shapeworld" and summary["prompt"] == PROMPT
                assert _text(result).startswith(f"status={summary['status']} ")
                assert f"iterations={summary['iterations']}" in _text(result)
                messages = [p.message for p in notes.progress]
                assert messages[0] == "plan" and messages[-1].startswith(f"stop: {summary['status']}")
                assert any(m.startswith("iteration 1: score") for m in messages)
                assert [p.progress for p in notes.progress] == list(range(1, len(messages) + 1))

                seen = len(notes.progress)  # no progress token: no notifications, same result
                quiet = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": 3})
                assert len(notes.progress) == seen
                assert quiet.structuredContent["steps"] == summary["steps"]

                bad = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": "three"})
                assert bad.isError and "three" in _text(bad), _text(bad)
                empty = await session.call_tool("generate_image", {"prompt": ""})
                assert empty.isError and "prompt" in _text(empty).lower()

    anyio.run(main)


@pytest.mark.slow
def test_stdio_cancellation_stops_the_run(tmp_path, tiny_klein_dir):
    async def main() -> None:
        notes = Notifications()
        params = StdioServerParameters(command=SERVER[0], args=SERVER[1:] + _klein_args(tiny_klein_dir), env=ENV)
        with open(tmp_path / "server.log", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), \
                    ClientSession(read, write, message_handler=notes) as session:
                await session.initialize()
                again = await _cancel_mid_run_then_run_again(session, notes)
                assert _image(again).size == (64, 64)

    anyio.run(main)
    _check_cancel_log((tmp_path / "server.log").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"server did not listen on {port}: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_streamable_http_returns_an_image_with_progress_and_cancels(tmp_path, tiny_klein_dir):
    port, log = _free_port(), tmp_path / "server.log"
    with open(log, "w") as errlog:
        proc = subprocess.Popen(SERVER + ["--http", "--host", "127.0.0.1", "--port", str(port)]
                                + _klein_args(tiny_klein_dir), env=ENV, stdout=errlog, stderr=errlog)
    try:
        _wait_for_port(proc, port, log)

        async def main() -> None:
            notes = Notifications()
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write, _), \
                    ClientSession(read, write, message_handler=notes) as session:
                await session.initialize()
                assert [t.name for t in (await session.list_tools()).tools] == ["generate_image"]
                result = await session.call_tool("generate_image", {"prompt": PROMPT, "seed": 0},
                                                 progress_callback=_progress_sink)
                assert not result.isError and _image(result).size == (64, 64)
                assert result.structuredContent["backend"] == "flux2-klein"
                denoise = [p.message for p in notes.progress if "denoising" in (p.message or "")]
                assert denoise[:2] == [f"step 0: denoising 1/{KLEIN_STEPS}", f"step 0: denoising 2/{KLEIN_STEPS}"]
                notes.first_denoise = anyio.Event()
                await _cancel_mid_run_then_run_again(session, notes)

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    _check_cancel_log(log.read_text())


def test_langchain_agent_uses_the_server_through_mcp_adapters(tmp_path):
    pytest.importorskip("langchain_mcp_adapters")
    from langchain.agents import create_agent
    from langchain_core.messages import ToolMessage
    from langchain_mcp_adapters.client import MultiServerMCPClient
    from langchain_mcp_adapters.tools import load_mcp_tools

    from tests.test_agent_tool import VisionFake, _describe

    client = MultiServerMCPClient({"clvr": {"transport": "stdio", "command": SERVER[0], "args": SERVER[1:],
                                            "env": ENV}})

    async def main() -> None:
        async with client.session("clvr") as session:
            (tool,) = await load_mcp_tools(session)
            assert tool.name == "generate_image" and set(tool.args) == {"prompt", "seed", "max_iterations"}
            msg = await tool.ainvoke({"name": tool.name, "args": {"prompt": PROMPT, "seed": 3}, "id": "t1",
                                      "type": "tool_call"})
            assert isinstance(msg, ToolMessage)
            (image,) = [b for b in msg.content if b["type"] == "image"]
            assert Image.open(io.BytesIO(base64.b64decode(image["base64"]))).size == (256, 256)
            assert msg.artifact["structured_content"]["seed"] == 3

            model = VisionFake(calls=[{"name": "generate_image", "args": {"prompt": PROMPT, "seed": 3}}])
            out = await create_agent(model, tools=[tool]).ainvoke(
                {"messages": [{"role": "user", "content": "draw two red circles left of a blue square"}]})
            assert out["messages"][-1].content == f"I see {_describe(base64.b64decode(image['base64']))}."

    anyio.run(main)


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "'nope'; known: "),
    (["--backend", "shapeworld", "--model", "x"], "--model is not used by --backend shapeworld"),
    (["--http", "--port", "0"], "--port must be 1-65535"),
])
def test_bad_server_options_exit_2_with_one_line(args, message):
    proc = subprocess.run(SERVER + args, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_version_is_the_installed_distribution():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "clvr_agent.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"clvr-agent {version('clvr-agent')}\n"


def test_the_readme_mcp_client_example_runs_as_written(tmp_path):
    import shutil

    from tests.test_agent_tool import readme_block

    if shutil.which("clvr") is None:
        pytest.skip("the clvr script is not on PATH")
    code = readme_block("Use it from any MCP client")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("status=") and "| unmet:" in proc.stdout
    assert Image.open(tmp_path / "mcp.png").size == (256, 256)


def test_the_readme_client_config_starts_the_server():
    import json
    import shutil

    from tests.test_agent_tool import readme_block

    config = json.loads(readme_block("Use it from any MCP client", "json"))["mcpServers"]["clvr"]
    if shutil.which(config["command"]) is None:
        pytest.skip("the clvr script is not on PATH")

    async def main() -> None:
        params = StdioServerParameters(command=config["command"], args=config["args"], env=ENV)
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert [t.name for t in (await session.list_tools()).tools] == ["generate_image"]

    anyio.run(main)
