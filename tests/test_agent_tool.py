"""clvr_tool hands the image over: as the tool message's artifact, and as an image block a multimodal
agent model receives; the LLM-facing arguments are coerced safely or refused readably."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import Field

from clvr_agent import create_clvr
from clvr_agent.app.agent_tool import TOOL_NAME, clvr_tool

PROMPT = "a photo of two red circles left of a blue square"


@pytest.fixture(scope="module")
def loop():
    return create_clvr("shapeworld", max_iterations=4)


def _call(args: dict, call_id: str = "c1") -> dict:
    return {"name": TOOL_NAME, "args": args, "id": call_id, "type": "tool_call"}


def _image_blocks(message: ToolMessage) -> list[dict]:
    if isinstance(message.content, str):
        return []
    return [b for b in message.content if isinstance(b, dict) and b.get("type") == "image"]


def _describe(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as im:
        colours = len(im.convert("RGB").getcolors(maxcolors=1 << 16))
        return f"a {im.width}x{im.height} {im.format} with {colours} colours"


class VisionFake(BaseChatModel):
    """A scripted multimodal model: it asks for the tool calls in ``calls`` one after the other,
    then describes the image the last tool message carried (or says it saw none)."""

    calls: list[dict]
    received: list = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "vision-fake"

    def bind_tools(self, tools: Any, **kw: Any) -> "VisionFake":
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        self.received.append(list(messages))
        answered = [m for m in messages if isinstance(m, ToolMessage)]
        if len(answered) < len(self.calls):
            reply = AIMessage(content="", tool_calls=[{**self.calls[len(answered)], "id": f"c{len(answered)}"}])
        else:
            blocks = _image_blocks(answered[-1])
            seen = _describe(base64.b64decode(blocks[0]["base64"])) if blocks else "no image"
            reply = AIMessage(content=f"I see {seen}.")
        return ChatResult(generations=[ChatGeneration(message=reply)])


def test_content_and_artifact_hands_over_the_image_and_summary(loop):
    tool = clvr_tool(loop, response_format="content_and_artifact")
    assert set(tool.args) == {"prompt", "seed", "max_iterations"}
    msg = tool.invoke(_call({"prompt": PROMPT, "seed": 3}))
    assert isinstance(msg, ToolMessage) and isinstance(msg.content, str)
    assert msg.content.startswith("status=") and len(msg.content) < 400  # what the agent's model reads
    image, summary = msg.artifact["image"], msg.artifact["summary"]
    png = base64.b64decode(image["base64"])
    assert png == Path(image["path"]).read_bytes() and image["mime_type"] == "image/png"
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    assert summary["final_image"] == image["path"] and summary["seed"] == 3 and summary["prompt"] == PROMPT
    assert summary["backend"] == "shapeworld" and summary["status"] in msg.content
    assert summary["iterations"] >= 1 and len(summary["steps"]) >= summary["iterations"]
    assert summary["total_nfe"] == sum(s["nfe"] for s in summary["steps"]) and summary["constraints"]


@pytest.mark.parametrize("in_message", [True, False])
def test_a_multimodal_agent_receives_the_image_block(loop, in_message):
    from langchain.agents import create_agent

    model = VisionFake(calls=[{"name": TOOL_NAME, "args": {"prompt": PROMPT, "seed": "3"}}])
    tool = clvr_tool(loop, response_format="content_and_artifact", image_in_message=in_message)
    out = agent_run(create_agent(model, tools=[tool]))
    tool_msg = next(m for m in out["messages"] if isinstance(m, ToolMessage))
    final = tool_msg.artifact["image"]["path"]
    # what the model was given on its second call: the tool message, with or without the image block
    given = next(m for m in model.received[1] if isinstance(m, ToolMessage))
    blocks = _image_blocks(given)
    if in_message:
        assert len(blocks) == 1 and blocks[0]["mime_type"] == "image/png"
        assert base64.b64decode(blocks[0]["base64"]) == Path(final).read_bytes()
        assert given.content[0]["type"] == "text" and given.content[0]["text"].startswith("status=")
        assert out["messages"][-1].content == f"I see {_describe(Path(final).read_bytes())}."
    else:
        assert blocks == [] and isinstance(given.content, str)
        assert out["messages"][-1].content == "I see no image."


def agent_run(agent) -> dict:
    return agent.invoke({"messages": [{"role": "user", "content": "draw two red circles left of a blue square"}]})


def test_llm_style_arguments_are_coerced_or_refused_readably(loop):
    tool = clvr_tool(loop, response_format="content_and_artifact")
    ok = tool.invoke(_call({"prompt": PROMPT, "seed": "7", "max_iterations": None}))
    assert ok.status == "success" and ok.artifact["summary"]["seed"] == 7
    refused = {
        "seed": {"prompt": PROMPT, "seed": "seven"},
        "not true/false": {"prompt": PROMPT, "seed": True},
        "max_iterations": {"prompt": PROMPT, "max_iterations": 0},
        "fractional": {"prompt": PROMPT, "seed": 2.5},
        "prompt is empty": {"prompt": "  "},
        "below 2**63": {"prompt": PROMPT, "seed": 2**64},
        "colour": {"prompt": PROMPT, "colour": "red"},
    }
    for needle, args in refused.items():
        msg = tool.invoke(_call(args))
        assert msg.status == "error" and msg.content.startswith(f"invalid arguments for {TOOL_NAME}: ")
        assert needle in msg.content, msg.content


def test_an_agent_reads_the_refusal_and_fixes_its_call(loop):
    from langchain.agents import create_agent

    model = VisionFake(calls=[{"name": TOOL_NAME, "args": {"prompt": PROMPT, "seed": "three"}},
                              {"name": TOOL_NAME, "args": {"prompt": PROMPT, "seed": 3}}])
    out = agent_run(create_agent(model, tools=[clvr_tool(loop, image_in_message=True)]))
    first, second = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert first.status == "error" and "seed:" in first.content
    assert len(_image_blocks(second)) == 1 and out["messages"][-1].content.startswith("I see a 256x256 PNG")


def test_async_tool_returns_the_same_artifact(loop):
    tool = clvr_tool(loop, response_format="content_and_artifact", image_in_message=True)
    sync = tool.invoke(_call({"prompt": PROMPT, "seed": 5}))
    asynchronous = asyncio.run(tool.ainvoke(_call({"prompt": PROMPT, "seed": 5})))
    assert asynchronous.artifact["summary"]["steps"] == sync.artifact["summary"]["steps"]
    assert _image_blocks(asynchronous)[0]["base64"] == _image_blocks(sync)[0]["base64"]


def test_bad_tool_options_fail_at_construction(loop):
    with pytest.raises(ValueError, match="response_format"):
        clvr_tool(loop, response_format="artifact")
    with pytest.raises(ValueError, match="max_iterations"):
        clvr_tool(loop, max_iterations=3)


def readme_block(section: str, lang: str = "python", index: int = 0) -> str:
    """A fenced code block of a README section, verbatim."""
    import re

    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end], re.S)[index]


def test_the_readme_agent_example_runs_as_written(tmp_path):
    import subprocess
    import sys

    code = readme_block("Use it as a tool in an agent")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.splitlines()
    assert first.startswith("status=satisfied image=") and second.startswith("image/png satisfied ")
