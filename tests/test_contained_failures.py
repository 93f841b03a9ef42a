"""Input validated before any model runs; model failures contained in the run's result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clvr_agent import create_clvr
from clvr_agent.protocols import GenerationOutput
from clvr_agent.tools.scripted import ScriptedController
from tests.test_graph import PixelExecutor


def _loop(tmp_path, executor=None, controller=None, **settings):
    ex = executor or PixelExecutor()
    ctl = controller or ScriptedController(scores=(0.5, 1.0))
    return create_clvr(ex, controller=ctl, artifact_dir=str(tmp_path / "art"), **settings), ex, ctl


def test_a_successful_executor_retry_keeps_its_image(tmp_path):
    run, ex, _ = _loop(tmp_path, executor=PixelExecutor(fail_times=1), executor_retries=1)
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "satisfied" and Path(out["final_image"]).is_file()
    gen = [c for c in out["trajectory"]["model_calls"] if c["model"] == "executor"]
    assert [c["ok"] for c in gen][:2] == [False, True]  # the failed attempt is on record, not fatal


class RaisingController(ScriptedController):
    """An API controller whose network fails on ``verify`` ``times`` times."""

    def __init__(self, times: int, **kw):
        super().__init__(**kw)
        self.times = times

    def verify(self, *a):
        if self.times:
            self.times -= 1
            raise ConnectionError("api.example.com: connection reset")
        return super().verify(*a)


def test_a_raising_controller_is_retried_then_ends_the_run_failed_with_artifacts(tmp_path):
    run, ex, _ = _loop(tmp_path, controller=RaisingController(times=1, scores=(1.0,)), controller_retries=1)
    assert run.invoke({"prompt": "p"})["status"] == "satisfied"  # one failure, one retry

    run, ex, _ = _loop(tmp_path, controller=RaisingController(times=99, scores=(1.0,)), controller_retries=2)
    out = run.invoke({"prompt": "p"})  # a result, not a traceback
    assert out["status"] == "failed" and "ConnectionError" in out["stop_reason"]
    assert "controller could not verify" in out["stop_reason"]
    verify_calls = [c for c in out["trajectory"]["model_calls"] if c["method"] == "verify"]
    assert len(verify_calls) == 3 and not any(c["ok"] for c in verify_calls)
    assert out["final_image"] and Path(out["final_image"]).is_file()  # the canvas drawn is kept


def test_a_controller_that_cannot_plan_at_all_ends_failed(tmp_path):
    class NoPlan(ScriptedController):
        def plan(self, prompt):
            raise TimeoutError("read timed out")

    run, ex, _ = _loop(tmp_path, controller=NoPlan(), controller_retries=0)
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "failed" and "TimeoutError" in out["stop_reason"] and ex.requests == []


@pytest.mark.parametrize("result", [None, "an image", GenerationOutput(image=None, nfe=1)])
def test_an_executor_result_that_is_not_an_image_fails_the_step_clearly(tmp_path, result):
    class Broken(PixelExecutor):
        def generate(self, request, references, progress=None):
            return result

    run, _, _ = _loop(tmp_path, executor=Broken())
    out = run.invoke({"prompt": "p"})
    assert out["status"] == "failed" and "not a GenerationOutput with a PIL image" in out["stop_reason"]


@pytest.fixture
def images(tmp_path):
    ok = tmp_path / "ok.png"
    Image.new("RGB", (32, 32)).save(ok)
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 5000)).save(huge)  # 25 MP: over the 4096² budget, cheap to write
    text = tmp_path / "text.png"
    text.write_text("not an image")
    return {"ok": str(ok), "huge": str(huge), "text": str(text), "missing": str(tmp_path / "missing.png")}


BAD_INPUTS = [
    ({"seed": "abc"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 10**23}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": [1]}, "seed"),
    ({"max_iterations": -1}, "max_iterations"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"max_iterations": 65}, "max_iterations"),
    ({"max_iterations": 10**6}, "max_iterations"),
    ({"max_iterations": "many"}, "max_iterations"),
    ({"max_iterations": False}, "max_iterations"),
    ({"references": "{ok}"}, "references"),
    ({"references": ["{missing}"]}, "references"),
    ({"references": ["{text}"]}, "references"),
    ({"references": ["{huge}"]}, "references"),
    ({"references": [3]}, "references"),
    ({"references": ["{ok}"] * 9}, "references"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"colour": "red"}, "colour"),
]


@pytest.mark.parametrize("bad, field", BAD_INPUTS)
def test_bad_input_is_refused_before_any_model_runs(tmp_path, images, bad, field):
    run, ex, ctl = _loop(tmp_path)
    inp = {"prompt": "a red circle", **bad}
    if "references" in inp and isinstance(inp["references"], list):
        inp["references"] = [r.format(**images) if isinstance(r, str) else r for r in inp["references"]]
    elif isinstance(inp.get("references"), str):
        inp["references"] = inp["references"].format(**images)
    with pytest.raises(ValueError) as info:
        run.invoke(inp)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message
    assert ex.requests == [] and ctl.calls == []  # nothing ran, so nothing was half-written
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


@pytest.mark.parametrize("args, field", [
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**63)], "seed"),
    (["--max-iterations", "0"], "max_iterations"),
    (["--max-iterations", "65"], "max_iterations"),
    (["--reference", "{huge}"], "references"),
])
def test_bad_input_on_the_cli_exits_2_naming_the_field(tmp_path, images, args, field):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clvr_agent.cli", "generate", "a red circle", "--out", str(out),
           *[a.format(**images) for a in args]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and field in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_runs_without_an_artifact_dir_clean_up_at_exit():
    code = ("import clvr_agent as c, pathlib; r = c.create_clvr();"
            "outs = [r.invoke({'prompt': 'a photo of a red circle', 'seed': i})['final_image'] for i in range(3)];"
            "print(sorted({str(pathlib.Path(o).parent) for o in outs}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    folders = eval(res.stdout.strip())
    assert len(folders) == 1  # one temp folder per runnable, not one per run
    assert not Path(folders[0]).exists()  # removed when the process exited


@pytest.mark.parametrize("settings, field", [({"max_iterations": 0}, "max_iterations"),
                                             ({"patience": -2}, "patience"), ({"seed": -5}, "seed"),
                                             ({"height": 64}, "give both height and width")])
def test_a_bad_setting_names_its_field(settings, field):
    with pytest.raises(ValueError) as info:
        create_clvr(**settings)
    assert field in str(info.value) and "validation error for" not in str(info.value)
