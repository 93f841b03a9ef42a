"""The public surface: the tool inside a LangChain agent, import hygiene, schema export."""

from __future__ import annotations

import json
import subprocess
import sys

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage

from clvr_agent import clvr_tool, create_clvr, trajectory_json_schema
from clvr_agent.state import ClvrContext, Settings
from clvr_agent.tools.scripted import ScriptedController
from tests.test_graph import PixelExecutor


class ToolCallingFake(GenericFakeChatModel):
    def bind_tools(self, tools, **kw):
        return self


def _runnable(tmp_path, scores=(0.4, 0.7)):
    ctx = ClvrContext(executor=PixelExecutor(), controller=ScriptedController(scores=scores),
                      settings=Settings(artifact_dir=str(tmp_path), max_iterations=2, patience=5))
    return create_clvr(context=ctx)


def test_tool_result_is_compact(tmp_path):
    tool = clvr_tool(_runnable(tmp_path))
    assert set(tool.args) == {"prompt", "seed", "max_iterations"}
    text = tool.invoke({"prompt": "a red circle", "seed": 1})
    assert text.startswith("status=budget_exhausted image=") and "iterations=2" in text
    assert "unmet: scripted miss 1" in text and len(text) < 400


def test_tool_inside_create_agent(tmp_path):
    from langchain.agents import create_agent

    model = ToolCallingFake(messages=iter([
        AIMessage(content="", tool_calls=[{"name": "clvr_generate_image", "args": {"prompt": "a blue star"}, "id": "c1"}]),
        AIMessage(content="Here is your image."),
    ]))
    agent = create_agent(model, tools=[clvr_tool(_runnable(tmp_path, scores=(1.0,)))])
    out = agent.invoke({"messages": [{"role": "user", "content": "draw a blue star"}]})
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert len(tool_msgs) == 1 and tool_msgs[0].content.startswith("status=satisfied image=")
    assert out["messages"][-1].content == "Here is your image."


def test_import_loads_no_model():
    code = ("import sys, clvr_agent, clvr_agent.graphs.graph, clvr_agent.tools.registry, clvr_agent.cli;"
            "print(sorted(m for m in ('torch','diffusers','transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trajectory_schema_is_versioned():
    schema = trajectory_json_schema()
    assert schema["version"] == "1.3" and "steps" in schema["properties"] and "model_calls" in schema["properties"]
    json.dumps(schema)
    from clvr_agent.types import Trajectory

    old = Trajectory.model_validate({"schema_version": "1.0", "prompt": "p", "seed": 0})  # 1.0 records load
    assert old.model_calls == []


def test_pre_1_3_trajectory_loads_final_image_into_final_canvas(tmp_path):
    """Schema 1.3 renamed the trajectory's final_image (an ImageRef) to final_canvas; older records load."""
    import pytest
    from pydantic import ValidationError

    from clvr_agent.app.runs import write_outputs
    from clvr_agent.types import Trajectory

    new = _runnable(tmp_path / "art").invoke({"prompt": "a red circle"})
    record = new["trajectory"]
    assert record["final_canvas"]["path"] == new["final_image"] and "final_image" not in record
    old = {k: v for k, v in record.items() if k != "final_canvas"} | {"schema_version": "1.2",
                                                                        "final_image": record["final_canvas"]}
    loaded = Trajectory.model_validate_json(json.dumps(old))
    assert loaded.final_canvas is not None and loaded.final_canvas.model_dump() == record["final_canvas"]
    (tmp_path / "run").mkdir()
    write_outputs(tmp_path / "run", loaded)  # written back: a 1.3 record
    written = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert written["schema_version"] == "1.3" and "final_image" not in written
    assert written["final_canvas"] == record["final_canvas"]
    assert (tmp_path / "run" / "final.png").read_bytes() == open(new["final_image"], "rb").read()
    with pytest.raises(ValidationError, match="final_image is the pre-1.3 name of final_canvas"):
        Trajectory.model_validate(old | {"final_canvas": record["final_canvas"]})


def test_studio_graph_runs_without_context():
    """langgraph.json serves clvr_agent/app/studio.py:graph; the server passes no context and no checkpointer."""
    import json as _json
    from pathlib import Path

    spec = _json.loads((Path(__file__).parent.parent / "langgraph.json").read_text())
    assert spec["graphs"]["clvr"] == "./clvr_agent/app/studio.py:graph"
    from clvr_agent.app.studio import graph

    assert graph.checkpointer is None
    out = graph.invoke({"prompt": "a photo of a green star"})
    assert out["status"] in ("satisfied", "budget_exhausted", "no_progress") and Path(out["final_image"]).is_file()


def test_trace_renders_in_headless_chromium(tmp_path):
    import shutil

    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    from clvr_agent.app.runs import write_outputs
    from clvr_agent.types import Trajectory

    out = _runnable(tmp_path / "art").invoke({"prompt": "a red circle"})
    write_outputs(tmp_path, Trajectory.model_validate(out["trajectory"]))
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}", f"--screenshot={shot}",
                    "--window-size=900,1200", (tmp_path / "trace.html").as_uri()],
                   capture_output=True, timeout=60, check=True)
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(1 << 20)
    assert colours is not None and len(colours) > 50  # text, badges and canvases, not a blank page
