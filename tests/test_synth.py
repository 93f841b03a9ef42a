"""Verified trajectory synthesis on ShapeWorld (CPU): the A/B filter, the record schema, resume, shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clvr_agent.state import Settings
from clvr_agent.tools.registry import get_controller, get_executor
from clvr_agent.training.synth import (
    SynthConfig,
    VerifierJudge,
    load_prompts,
    merge_shards,
    run_seed,
    single_step_image,
    synthesize,
)
from clvr_agent.types import Trajectory

N = 16


@pytest.fixture(scope="module")
def backends():
    return get_executor("shapeworld"), get_controller("shapeworld")


def synth(out, backends, n=N, judge=None, controller=None, **kw):
    executor, ctl = backends
    return synthesize(SynthConfig(out=str(out), n=n, progress=False, max_iterations=6, **kw),
                      executor, controller or ctl, judge=judge)


def records(out: Path, pattern: str = "data-*.jsonl", strip: bool = True) -> list[dict]:
    """The kept records, without the wall-clock ``timings`` and per-call seconds (all a rerun changes)."""
    recs = [json.loads(ln) for f in sorted(out.glob(pattern)) for ln in f.read_text().splitlines()]
    for rec in recs if strip else []:
        for call in rec.get("model_calls", []):
            call.pop("seconds")
        for step in rec["steps"]:
            step.pop("timings")
    return recs


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, backends):
    out = tmp_path_factory.mktemp("synth")
    return out, synth(out, backends)


def test_a_judge_that_rejects_everything_keeps_nothing(tmp_path, backends):
    calls = []

    def never(prompt, loop_image, single_image):
        calls.append(prompt)
        return 0.0  # a tie is a loss

    report = synth(tmp_path, backends, n=8, judge=never)
    assert report.kept == 0 and records(tmp_path) == []
    assert report.tried == 8 and len(calls) == 8 - report.rejected.get("unexecuted step kept", 0)
    assert len((tmp_path / "done-00000-of-00001.jsonl").read_text().splitlines()) == 8
    assert not list((tmp_path / "images").iterdir())


def test_default_judge_keeps_only_loop_wins(default_run, backends):
    out, report = default_run
    kept = records(out, strip=False)
    assert 0 < report.kept == len(kept) < N, report  # some prompts are solved in one shot: a tie, not kept
    executor, ctl = backends
    judge = VerifierJudge(ctl)
    for rec in kept:
        traj = Trajectory.model_validate(rec)  # the loop's own schema, nothing extra
        final = Image_open(out / traj.final_canvas.path)
        single = single_step_image(executor, traj.prompt, traj.seed, Settings())
        assert judge(traj.prompt, final, single) > 0
        assert traj.iterations >= 2 and traj.status != "failed"
        # passive verification: only executed steps remain, and every image lives under OUT
        assert all(s.accepted and (s.passive is None or s.passive.executed) for s in traj.steps)
        refs = [traj.final_canvas] + [s.canvas for s in traj.steps] + [r for s in traj.steps for r in s.request.references]
        assert all(not Path(r.path).is_absolute() and (out / r.path).is_file() for r in refs)
    done = [json.loads(ln) for ln in (out / "done-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(done) == N and sum(d["kept"] for d in done) == report.kept
    assert all(d["judge"] <= 0 for d in done if d["reason"] == "did not beat single-step")


def Image_open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_datasets_reads_the_output(default_run):
    from datasets import load_dataset

    out, report = default_run
    ds = load_dataset("json", data_files=str(out / "data-*.jsonl"), split="train")
    assert ds.num_rows == report.kept
    assert {"prompt", "seed", "plan", "steps", "final_canvas", "status"} <= set(ds.column_names)
    assert all(len(steps) >= 2 for steps in ds["steps"])


class RecordingController:
    """The ShapeWorld controller, noting every prompt the loop plans."""

    name = "shapeworld"

    def __init__(self, inner):
        self.inner, self.planned = inner, []

    def plan(self, prompt):
        self.planned.append(prompt)
        return self.inner.plan(prompt)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def test_resume_does_not_redo_prompts(tmp_path, backends):
    executor, ctl = backends
    judge = VerifierJudge(ctl)
    first = synth(tmp_path, backends, n=6, judge=judge)
    with open(tmp_path / "data-00000-of-00001.jsonl", "a") as f:
        f.write('{"schema_version": "1.0", "prom')  # a run killed mid-write
    rec = RecordingController(ctl)
    second = synth(tmp_path, backends, n=10, judge=judge, controller=rec)
    prompts = load_prompts(SynthConfig(out=str(tmp_path), n=10))
    assert second.skipped == 6 and second.tried == 4
    assert rec.planned == prompts[6:]
    # the longer run extends the shorter one: same records as a fresh 10-prompt run
    fresh = tmp_path / "fresh"
    synth(fresh, backends, n=10, judge=judge)
    assert records(tmp_path) == records(fresh)
    assert first.kept + second.kept == len(records(fresh))
    with pytest.raises(ValueError, match="was made with seed=0"):
        synth(tmp_path, backends, n=10, seed=1)


def test_two_shards_merge_to_the_one_run_set(tmp_path, default_run, backends):
    one, _ = default_run
    two = tmp_path / "two"
    a = synth(two, backends, shard=(0, 2))
    b = synth(two, backends, shard=(1, 2))
    assert a.tried == b.tried == N // 2
    merge_shards(one), merge_shards(two)
    assert records(one, "data.jsonl") == records(two, "data.jsonl")
    assert sorted(p.name for p in (one / "images").iterdir()) == sorted(p.name for p in (two / "images").iterdir())
    seeds = {json.loads(ln)["seed"] for ln in (two / "data.jsonl").read_text().splitlines()}
    assert seeds <= {run_seed(0, i) for i in range(N)}


def test_config_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="0 <= k < n"):
        SynthConfig(out=str(tmp_path), shard=(2, 2))
    with pytest.raises(ValueError, match="use 2 or more"):
        SynthConfig(out=str(tmp_path), max_iterations=1)
    with pytest.raises(ValueError, match="neither a generator"):
        SynthConfig(out=str(tmp_path), prompts="nope.txt")
    with pytest.raises(ValueError, match="may not set"):
        SynthConfig(out=str(tmp_path), loop_settings={"seed": 3})
    file = tmp_path / "prompts.txt"
    file.write_text("a photo of a red circle\n")
    with pytest.raises(ValueError, match="holds 1 prompts but n=2"):
        load_prompts(SynthConfig(out=str(tmp_path), prompts=str(file), n=2))


def test_cli_synth(tmp_path):
    from clvr_agent.cli.data import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `synth` a named subcommand
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "o"), "--n", "6", "--shard", "1/2", "--merge",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "of 3 tried" in res.output
    assert len((tmp_path / "o" / "data.jsonl").read_text().splitlines()) == int(res.output.split()[1]) > 0
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "o"), "--shard", "3"])
    assert bad.exit_code == 2 and "expected K/N" in bad.output
