"""The real LangGraph server (``langgraph dev`` over ``langgraph.json``) driven by the official
``langgraph_sdk`` client, as a user deploying the plugin would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of two red circles left of a blue square"

pytest.importorskip("langgraph_api", reason="langgraph-cli[inmem] is not installed")
sdk = pytest.importorskip("langgraph_sdk")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cli = shutil.which("langgraph", path=str(Path(sys.executable).parent)) or shutil.which("langgraph")
    if cli is None:
        pytest.skip("the langgraph CLI is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([cli, "dev", "--port", str(port), "--host", "127.0.0.1", "--no-browser",
                                 "--no-reload"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/ok", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("langgraph dev did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
    yield sdk.get_sync_client(url=url)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _thread(client) -> str:
    return client.threads.create()["thread_id"]


def test_runs_wait_returns_the_final_image(server):
    out = server.runs.wait(_thread(server), "clvr", input={"prompt": PROMPT, "seed": 1})
    assert out["status"] == "satisfied" and Path(out["final_image"]).is_file()
    assert out["trajectory"]["backend"] == "shapeworld"


def test_runs_stream_yields_node_updates_and_progress(server):
    chunks = list(server.runs.stream(_thread(server), "clvr", input={"prompt": PROMPT, "seed": 1},
                                     stream_mode=["updates", "custom"]))
    updates = [c.data for c in chunks if c.event == "updates"]
    custom = [c.data for c in chunks if c.event == "custom"]
    nodes = [next(iter(u)) for u in updates]
    assert nodes[0] == "plan" and nodes[-1] == "stop" and "generate" in nodes and "verify" in nodes
    kinds = {e["event"] for e in custom}
    assert {"node_start", "denoise", "iteration", "stop"} <= kinds
    assert updates[-1]["stop"]["status"] == "satisfied"


def test_an_assistants_context_is_obeyed(server):
    one = server.assistants.create("clvr", context={"max_iterations": 1}, name="one-shot")
    # seed 3 needs more than one iteration under the defaults
    assert server.runs.wait(_thread(server), "clvr", input={"prompt": PROMPT, "seed": 3})["iterations"] > 1
    out = server.runs.wait(_thread(server), one["assistant_id"], input={"prompt": PROMPT, "seed": 3})
    assert out["iterations"] == 1 and out["status"] == "budget_exhausted"


def test_runs_cancel_stops_a_running_run(server):
    slow = server.assistants.create("clvr", context={"executor_options": {"latency_s": 60, "denoise_steps": 600}})
    thread = _thread(server)
    run = server.runs.create(thread, slow["assistant_id"], input={"prompt": PROMPT})
    deadline = time.monotonic() + 60
    while server.runs.get(thread, run["run_id"])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # inside the 60 s draw
    t0 = time.monotonic()
    server.runs.cancel(thread, run["run_id"], wait=True)
    assert time.monotonic() - t0 < 20
    assert server.runs.get(thread, run["run_id"])["status"] == "interrupted"
    assert "stop" not in (server.threads.get_state(thread)["values"] or {}).get("status", "")
    # the server stays usable
    assert server.runs.wait(_thread(server), "clvr", input={"prompt": PROMPT, "seed": 1})["status"] == "satisfied"


def test_the_graph_reports_its_schemas(server):
    default = server.assistants.search(graph_id="clvr", metadata={"created_by": "system"})[0]
    schemas = server.assistants.get_schemas(default["assistant_id"])
    assert set(schemas["input_schema"]["properties"]) == {"prompt", "seed", "max_iterations", "references"}
    assert {"status", "final_image", "iterations", "trajectory"} <= set(schemas["output_schema"]["properties"])
    ctx = schemas["context_schema"]["properties"]
    assert ctx["backend"]["default"] == "shapeworld" and ctx["max_iterations"]["default"] == 8


def test_bad_input_fails_the_run_naming_the_field(server):
    thread = _thread(server)
    run = server.runs.create(thread, "clvr", input={"prompt": PROMPT, "seed": -1})
    server.runs.join(thread, run["run_id"])
    assert server.runs.get(thread, run["run_id"])["status"] == "error"
    assert server.threads.get_state(thread)["values"].get("steps") in (None, [])
