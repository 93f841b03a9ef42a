"""The `clvr` command line on the embedded ShapeWorld backend: outputs, JSON, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clvr_agent.cli import app

runner = CliRunner()
PROMPT = "a photo of two red circles left of a blue square"


def clvr(*args: str):
    return runner.invoke(app, list(args))


def test_generate_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    res = clvr("generate", PROMPT, "--out", str(out), "--json", "--seed", "1")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["status"] in ("satisfied", "budget_exhausted", "no_progress")
    for name in ("final.png", "trajectory.json", "trace.html", "checkpoints.sqlite"):
        assert (out / name).is_file(), name
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["schema_version"] == "1.3" and traj["prompt"] == PROMPT
    # paths are relative to the run folder, so it can move
    assert all(s["canvas"]["path"].startswith("steps/") and (out / s["canvas"]["path"]).is_file() for s in traj["steps"])
    html = (out / "trace.html").read_text()
    assert PROMPT in html and "Stop reason" in html and 'src="steps/' in html


def test_json_stdout_is_one_object(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clvr_agent.cli", "generate", "a photo of a blue star", "--out",
         str(tmp_path / "r"), "--json"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) >= {"status", "final_image", "iterations"}


def test_trace_command_rerenders(tmp_path):
    out = tmp_path / "run"
    assert clvr("generate", PROMPT, "--out", str(out)).exit_code == 0
    (out / "trace.html").unlink()
    res = clvr("trace", str(out))
    assert res.exit_code == 0 and (out / "trace.html").is_file()
    assert "step 0" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "", "--out", "{tmp}/a"], "prompt is empty"),
        (["generate", "   ", "--out", "{tmp}/a"], "prompt is empty"),
        (["generate", "x" * 2500, "--out", "{tmp}/a"], "limit is 2000"),
        (["generate", PROMPT, "--out", "{tmp}/a", "--backend", "nope"], "known: clvr-mini, flux2-klein, shapeworld"),
        (["generate", PROMPT, "--out", "{tmp}/a", "--reference", "{tmp}/missing.png"], "reference image not found"),
        (["generate", PROMPT, "--out", "{tmp}/a", "--reference", "{tmp}/bad.png"], "not a readable image"),
        (["generate", PROMPT, "--out", "{tmp}/a", "--backend", "flux2-klein"], "needs --model"),
        (["trace", "{tmp}/nowhere"], "no trajectory.json"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    (tmp_path / "bad.png").write_text("nope")
    res = clvr(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "a").exists()


def test_a_run_folder_is_kept_unless_it_is_the_same_run(tmp_path):
    out = tmp_path / "run"
    assert clvr("generate", PROMPT, "--out", str(out)).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    final = (out / "final.png").read_bytes()
    again = clvr("generate", PROMPT, "--out", str(out))  # the same command: the finished run, reported again
    assert again.exit_code == 0 and (out / "final.png").read_bytes() == final
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == before  # nothing redrawn
    res = clvr("generate", "a photo of a blue star", "--out", str(out))
    assert res.exit_code == 2 and "--overwrite" in res.output and "a photo of a blue star" in res.output
    assert (out / "final.png").read_bytes() == final
    assert clvr("generate", "a photo of a blue star", "--out", str(out), "--overwrite").exit_code == 0


def test_resume_without_checkpoint_is_an_error(tmp_path):
    res = clvr("generate", PROMPT, "--out", str(tmp_path / "x"), "--resume")
    assert res.exit_code == 2 and "nothing to resume" in res.output


def test_interactive_approves_at_terminal(tmp_path):
    res = runner.invoke(app, ["generate", PROMPT, "--out", str(tmp_path / "r"), "--interactive"], input="y\ny\n")
    assert res.exit_code == 0, res.output
    assert "Approve the plan?" in res.output


def test_backend_without_its_packages_exits_2_naming_the_extra(tmp_path, monkeypatch):
    from clvr_agent.tools import registry

    def needs_missing_package(**kw):
        import clvr_agent_not_installed_xyz  # noqa: F401  (what a missing torch looks like)

    registry.executor_names()
    monkeypatch.setitem(registry._EXECUTORS, "needs-extra", needs_missing_package)
    for args in (["generate", PROMPT, "--out", str(tmp_path / "a"), "--backend", "needs-extra"],
                 ["eval", "shapeworld", "--n", "1", "--out", str(tmp_path / "e"), "--backend", "needs-extra"]):
        res = clvr(*args)
        assert res.exit_code == 2, res.output
        assert "pip install 'clvr-agent[models]'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "a").exists()  # untouched: the same command runs once the extra is installed


def test_eval_shapeworld_runs_a_trained_model_folder(tmp_path, tiny_klein_dir):
    """`--model` takes the folder a trainer wrote; the summary names it; a missing folder is exit 2 at once."""
    out = tmp_path / "e"
    res = clvr("eval", "shapeworld", "--mode", "single", "--n", "2", "--backend", "flux2-klein",
               "--model", str(tiny_klein_dir), "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu",
               "--out", str(out))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor_options"]["model"] == str(tiny_klein_dir) and summary["n"] == 2
    assert summary["request"] == {"steps": 2, "height": 16, "width": 16}
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    for args, message in ((["--backend", "clvr-mini", "--model", str(tmp_path / "missing")], "does not exist"),
                          (["--model", str(tiny_klein_dir)], "--model is not used by --backend shapeworld"),
                          (["--controller", "chat-model", "--base-url", "http://x"], "clvr eval controller")):
        bad = clvr("eval", "shapeworld", "--n", "1", "--out", str(tmp_path / "bad"), *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "bad").exists()
