"""Runs that survive anything: kills at any instant, two writers, full and read-only disks, moved
folders, planted symlinks. The CLI is run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPT = "a photo of two red circles left of a blue square"
SEED = "3"  # needs three iterations under the defaults
SLOW = ["--executor-option", "latency_s=0.3", "--executor-option", "denoise_steps=6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(out: Path, *extra: str, prompt: str = PROMPT, seed: str = SEED, timeout: float = 300):
    cmd = [sys.executable, "-m", "clvr_agent.cli", "generate", prompt, "--out", str(out), "--seed", seed, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clvr_agent.cli", "generate", PROMPT, "--out", str(out), "--seed", SEED, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, "the worker ended first"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def canvases(out: Path) -> int:
    return len(list((out / "steps").glob("*.png"))) if (out / "steps").is_dir() else 0


def stray_temps(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = cli(out)
    assert res.returncode == 0, res.stderr
    traj = json.loads((out / "trajectory.json").read_text())
    return {"final": (out / "final.png").read_bytes(), "steps": len(traj["steps"]), "iterations": traj["iterations"]}


def assert_same_run(out: Path, reference: dict) -> None:
    assert (out / "final.png").read_bytes() == reference["final"]
    traj = json.loads((out / "trajectory.json").read_text())
    executor_calls = [c for c in traj["model_calls"] if c["model"] == "executor"]
    assert len(traj["steps"]) == len(executor_calls) == reference["steps"]  # no step drawn twice
    assert stray_temps(out) == []


def test_sigkill_at_random_instants_then_rerun_gives_the_same_image(tmp_path, reference):
    """N kills at random instants (env CLVR_KILLS, default 4), each followed by a plain re-run."""
    rng = random.Random(int(os.environ.get("CLVR_KILL_SEED", "0")))
    kills = int(os.environ.get("CLVR_KILLS", "4"))
    for i in range(kills):
        out = tmp_path / f"run{i}"
        proc = start(out, *SLOW)
        time.sleep(rng.uniform(0.0, 4.0))  # from process start (imports) to the end of the loop
        proc.kill()
        proc.wait(30)
        res = cli(out, *SLOW)
        assert res.returncode == 0, (i, res.stderr)
        assert_same_run(out, reference)


def test_crash_before_the_first_checkpoint_leaves_a_usable_folder(tmp_path, reference):
    from clvr_agent.app.runs import open_checkpointer, prepare_out_dir
    from clvr_agent.state import ClvrInput

    for how in (["--resume"], []):
        out = tmp_path / ("resume" if how else "rerun")
        inputs = ClvrInput(prompt=PROMPT, seed=int(SEED), max_iterations=8).model_dump()
        prepare_out_dir(out, inputs=inputs, resume=False, overwrite=False)
        open_checkpointer(out).conn.close()  # the file exists, no checkpoint in it: the killed window
        res = cli(out, *how)
        assert res.returncode == 0, res.stderr
        assert_same_run(out, reference)


def test_a_second_process_on_the_same_folder_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = start(out, "--executor-option", "latency_s=4", "--executor-option", "denoise_steps=40")
    wait_for(lambda: canvases(out) >= 1, first)  # the first holds the lock for 8+ s more
    second = cli(out, "--resume")
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(120) == 0


def test_resume_with_another_prompt_or_seed_exits_2(tmp_path):
    out = tmp_path / "run"
    assert cli(out).returncode == 0
    for kw in ({"prompt": "a photo of a blue star"}, {"seed": "4"}):
        res = cli(out, "--resume", **kw)
        assert res.returncode == 2 and "holds a run with" in res.stderr and "Traceback" not in res.stderr


def test_sigterm_writes_partial_outputs_and_the_run_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, *SLOW)
    wait_for(lambda: canvases(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    assert code == 143, proc.stderr.read()[-3000:]  # a CI run once got 1: show why if it recurs
    partial = json.loads((out / "trajectory.json").read_text())
    assert partial["status"] == "running" and partial["steps"] and (out / "trace.html").is_file()
    assert "http-equiv=\"refresh\"" in (out / "trace.html").read_text()  # the page says it is still running
    assert cli(out, "--resume").returncode == 0
    assert_same_run(out, reference)


def test_a_moved_or_copied_folder_resumes_and_shows_its_own_images(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, *SLOW)
    wait_for(lambda: canvases(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    assert cli(moved).returncode == 0
    assert_same_run(moved, reference)
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved)
    res = subprocess.run([sys.executable, "-m", "clvr_agent.cli", "trace", str(copy)], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import re

    srcs = re.findall(r'<img[^>]* src="([^"]+)"', (copy / "trace.html").read_text())
    assert srcs and all(not os.path.isabs(s) and (copy / s).is_file() for s in srcs)


def test_overwrite_replaces_only_a_clvr_run(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("do not delete")
    res = cli(other, "--overwrite")
    assert res.returncode == 2 and "not a clvr run folder" in res.stderr
    assert (other / "thesis.tex").read_text() == "do not delete"


def test_outputs_never_follow_a_planted_symlink(tmp_path):
    out = tmp_path / "run"
    assert cli(out).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("outside --out")
    (out / "final.png").unlink()
    (out / "final.png").symlink_to(victim)
    res = cli(out, "--resume")
    assert res.returncode == 2 and "symlink" in res.stderr
    assert victim.read_text() == "outside --out"


# ---------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 400 KB (room for the run's files and two canvases); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_exit_2_and_resumable(small_disk, reference):
    out = small_disk / "run"
    res = cli(out)
    assert res.returncode == 2, res.stderr
    assert "no space left on device" in res.stderr or "disk is full" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert stray_temps(out) == []
    if (out / "final.png").exists():  # never a truncated copy
        assert (out / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    again = cli(out)
    assert again.returncode == 0, again.stderr
    assert (out / "final.png").read_bytes() == reference["final"] and stray_temps(out) == []


def test_read_only_folder_is_one_line_exit_2_and_resumable(small_disk, reference):
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    out = small_disk / "run"
    proc = start(out, *SLOW)
    wait_for(lambda: canvases(out) >= 1, proc)
    proc.kill()
    proc.wait(30)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = cli(out)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "read-only" in res.stderr or "readonly" in res.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert cli(out).returncode == 0
    assert (out / "final.png").read_bytes() == reference["final"]


def test_an_injected_enospc_while_writing_outputs_leaves_no_temp_file(tmp_path, monkeypatch):
    """Where tmpfs cannot be mounted: the same failure, injected into the atomic writer."""
    import errno

    from clvr_agent.app import runs
    from clvr_agent.types import Trajectory

    out = tmp_path / "run"
    out.mkdir()
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(runs.os, "replace", full_disk)
    with pytest.raises(OSError) as info:
        runs.write_outputs(out, Trajectory(prompt="p", seed=0))
    monkeypatch.setattr(runs.os, "replace", real_replace)
    assert runs.describe_os_error(info.value).startswith("no space left on device writing")
    assert list(out.iterdir()) == []
