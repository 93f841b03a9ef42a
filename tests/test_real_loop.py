"""The whole loop on tiny real-class models: klein executor + scripted chat model, and the CLI path."""

from __future__ import annotations

import json

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from typer.testing import CliRunner

from clvr_agent.app.api import create_clvr
from clvr_agent.cli import app
from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

PLAN = {"constraints": [{"id": "c0", "text": "a red cube", "kind": "presence"},
                        {"id": "c1", "text": "on a blue sphere", "kind": "relation"}],
        "first_instruction": "a red cube on a blue sphere", "reasoning": "two objects, one relation"}
CHECK_OK = {"executed": True, "detail": "drawn"}
VERDICT_MISS = {"satisfied": False, "score": 0.5, "summary": "no sphere",
                "constraints": [{"id": "c0", "satisfied": True, "detail": ""},
                                {"id": "c1", "satisfied": False, "detail": "the sphere is missing"}]}
CORRECTION = {"instruction": "add a blue sphere under the red cube", "mode": "edit", "reasoning": "fix c1"}
VERDICT_OK = {"satisfied": True, "score": 1.0, "summary": "all there",
              "constraints": [{"id": "c0", "satisfied": True, "detail": ""}, {"id": "c1", "satisfied": True, "detail": ""}]}


class RecordingExecutor(Flux2KleinExecutor):
    def generate(self, request, references, progress=None):
        self.seen = getattr(self, "seen", []) + [(request, [r.copy() for r in references])]
        return super().generate(request, references, progress)


def test_klein_with_scripted_chat_model_runs_the_full_loop(tiny_klein, tmp_path):
    replies = [PLAN, CHECK_OK, VERDICT_MISS, CORRECTION, CHECK_OK, VERDICT_OK]
    chat = GenericFakeChatModel(messages=iter([AIMessage(json.dumps(r)) for r in replies]))
    executor = RecordingExecutor(tiny_klein)
    run = create_clvr(executor, controller=chat, artifact_dir=str(tmp_path), height=64, width=64)
    chunks = list(run.stream({"prompt": "a red cube on a blue sphere", "seed": 0}, stream_mode="updates"))
    assert [list(c)[0] for c in chunks] == ["plan", "generate", "verify", "correct", "generate", "verify", "stop"]
    final = chunks[-1]["stop"]
    assert final["status"] == "satisfied" and final["iterations"] == 2
    steps = final["trajectory"]["steps"]
    assert [s["nfe"] for s in steps] == [4, 4]  # distilled: exactly 4 transformer passes per step
    (req0, refs0), (req1, refs1) = executor.seen
    assert req0.mode == "generate" and refs0 == []
    assert req1.mode == "edit" and req1.instruction == CORRECTION["instruction"]
    # the executor really received the prior canvas
    from PIL import Image

    prior = Image.open(steps[0]["canvas"]["path"]).convert("RGB")
    assert len(refs1) == 1 and refs1[0].tobytes() == prior.tobytes()
    assert "a red cube on a blue sphere\nadd a blue sphere" in req1.accumulated_prompt


def test_cli_flux2_klein_with_garbage_vlm_keeps_canvases(tiny_klein_dir, tmp_path):
    """Random Qwen3-VL weights write garbage: the plan falls back, the executor still draws (NFE 4),
    verification fails cleanly, and every canvas stays on disk and in trajectory.json."""
    from clvr_agent.tools.tiny_vlm import build_tiny_qwen3_vl

    model, processor = build_tiny_qwen3_vl(seed=0)
    vlm_dir = tmp_path / "vlm"
    model.save_pretrained(vlm_dir)
    processor.save_pretrained(vlm_dir)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "generate", "a red cube on a blue sphere", "--backend", "flux2-klein", "--model", str(tiny_klein_dir),
        "--controller", "qwen3-vl", "--vlm", str(vlm_dir), "--dtype", "float32", "--device", "cpu",
        "--height", "64", "--width", "64", "--out", str(out), "--json",
    ])
    assert res.exit_code == 1, res.output  # status failed
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["status"] == "failed"
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["plan"]["fallback"] is True
    assert traj["steps"][0]["nfe"] == 4 and (out / "final.png").is_file() and (out / "trace.html").is_file()


def test_cli_chat_model_controller_against_an_openai_compatible_server(tiny_klein_dir, tmp_path):
    """`--controller chat-model --base-url` talks to a real HTTP server speaking the OpenAI chat API
    (scripted replies), with the klein executor loaded from a local folder."""
    import http.server
    import threading

    import pytest

    pytest.importorskip("langchain_openai")
    replies = iter([PLAN, CHECK_OK, VERDICT_MISS, CORRECTION, CHECK_OK, VERDICT_OK])
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            content = json.dumps(next(replies))
            payload = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "run"
        res = CliRunner().invoke(app, [
            "generate", "a red cube on a blue sphere", "--backend", "flux2-klein", "--model", str(tiny_klein_dir),
            "--controller", "chat-model", "--base-url", f"http://127.0.0.1:{server.server_port}/v1",
            "--model-name", "served-vlm", "--dtype", "float32", "--device", "cpu",
            "--height", "64", "--width", "64", "--out", str(out), "--json",
        ])
    finally:
        server.shutdown()
    assert res.exit_code == 0, res.output
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["status"] == "satisfied" and [s["nfe"] for s in traj["steps"]] == [4, 4]
    assert traj["steps"][1]["request"]["mode"] == "edit" and len(traj["steps"][1]["request"]["references"]) == 1
    assert (out / "trace.html").is_file() and len(seen) == 6 and seen[0]["model"] == "served-vlm"
    # images travel as data-URL content blocks (the verify call carries the canvas)
    parts = [p for m in seen[2]["messages"] if isinstance(m["content"], list) for p in m["content"]]
    assert any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts)
