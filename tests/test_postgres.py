"""Durable runs on a real PostgreSQL server: a worker killed mid-run resumes from Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.postgres_server import postgres_bin, postgres_server

pytest.importorskip("langgraph.checkpoint.postgres", reason="langgraph-checkpoint-postgres is not installed")
if postgres_bin() is None:
    pytest.skip("PostgreSQL server binaries are not installed", allow_module_level=True)

PROMPT = "a photo of two red circles left of a blue square"


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


def _generate(out, url, *extra, **popen):
    cmd = [sys.executable, "-m", "clvr_agent.cli", "generate", PROMPT, "--out", str(out), "--seed", "3",
           "--checkpointer", url, "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_killed_worker_resumes_from_postgres_to_the_same_image(pg_url, tmp_path):
    import json

    ref = _generate(tmp_path / "ref", pg_url)
    assert ref.returncode == 0, ref.stderr
    expected = json.loads((tmp_path / "ref" / "trajectory.json").read_text())
    assert expected["iterations"] >= 2

    out = tmp_path / "killed"
    # each executor call takes 1 s (ShapeWorld's latency simulation), so the kill lands mid-run
    worker = _generate(out, pg_url, "--executor-option", "latency_s=1", "--executor-option", "denoise_steps=10",
                       start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "steps").glob("*.png"))) < 1:
        assert worker.poll() is None and time.monotonic() < deadline, "the worker ended before the kill"
        time.sleep(0.05)
    time.sleep(0.5)  # inside the second executor call
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(30)
    assert not (out / "final.png").exists()
    assert not (out / "checkpoints.sqlite").exists()  # the checkpoints are in Postgres

    resumed = _generate(out, pg_url, "--resume")  # a fresh worker, from the Postgres checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "final.png").read_bytes() == (tmp_path / "ref" / "final.png").read_bytes()
    got = json.loads((out / "trajectory.json").read_text())
    executor_calls = [c for c in got["model_calls"] if c["model"] == "executor"]
    assert len(executor_calls) == len(got["steps"]) == len(expected["steps"])  # no step drawn twice


def test_resume_needs_the_same_checkpointer(pg_url, tmp_path):
    out = tmp_path / "run"
    assert _generate(out, pg_url).returncode == 0
    cmd = [sys.executable, "-m", "clvr_agent.cli", "generate", PROMPT, "--out", str(out), "--seed", "3", "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--checkpointer" in res.stderr and "Traceback" not in res.stderr
