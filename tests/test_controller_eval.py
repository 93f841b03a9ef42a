"""`clvr eval controller`: the oracle measured against itself scores 1, a yes-sayer is caught."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from clvr_agent.eval.controller import eval_controller
from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.types import ConstraintResult, Verdict


class YesSayer(ShapeWorldController):
    """Plans and corrects like the oracle but calls every canvas satisfied."""

    def verify(self, prompt, plan, canvas, history):
        return Verdict(satisfied=True, score=1.0, summary="every clause holds",
                       constraints=[ConstraintResult(id=c.id, satisfied=True) for c in plan.constraints])


def test_the_oracle_agrees_with_itself_and_the_loop_beats_single_step(tmp_path):
    s = eval_controller(ShapeWorldController(), "oracle", n=12, calls_n=6, seed=3, out_dir=tmp_path, progress=False)
    c = s["calls"]
    assert c["plan_exact"] == c["verify_constraint_agreement"] == c["check_agreement"] == 1.0
    assert c["verify_swapped_agreement"] == 1.0 and c["verify_swapped_unmet_fraction"] > 0.2
    assert c["verify_unchanged_by_swap"] == c["verify_swapped_text_only"] < 1.0
    assert c["satisfied_precision"] == c["satisfied_recall"] == 1.0
    assert c["counts"]["plan"] == 6 and c["counts"]["verify"] >= 6
    assert s["loops"]["learned"]["overall"] == s["loops"]["oracle"]["overall"] == 1.0
    assert s["loops"]["single"]["overall"] < 1.0
    assert (tmp_path / "table.md").read_text().count("\n| ") >= 10
    rows = [json.loads(ln) for ln in (tmp_path / "loops.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"single", "oracle", "learned"} and len(rows) == 36
    d = s["differences"]
    assert d["learned - oracle"] == {**d["learned - oracle"], "diff": 0.0, "lo": 0.0, "hi": 0.0}
    gain = s["loops"]["oracle"]["overall"] - s["loops"]["single"]["overall"]
    assert abs(d["oracle - single"]["diff"] - gain) < 1e-9 and d["oracle - single"]["lo"] <= gain <= d["oracle - single"]["hi"]
    assert d["oracle - single"]["n"] == 12 and "| oracle - single |" in (tmp_path / "table.md").read_text()


def test_a_controller_that_always_says_satisfied_is_caught(tmp_path):
    s = eval_controller(YesSayer(), "yes", n=12, calls_n=12, seed=3, out_dir=tmp_path, progress=False)
    c = s["calls"]
    assert c["satisfied_recall"] == 1.0
    assert c["satisfied_precision"] == c["truly_satisfied_fraction"] < 1.0
    assert c["verify_constraint_agreement"] < 1.0
    # it stops after the first canvas: one iteration per prompt, and no better than single step
    assert s["loops"]["learned"]["mean_iterations"] == 1.0
    assert s["loops"]["learned"]["overall"] < s["loops"]["oracle"]["overall"]
    # paired with single step on the same first canvases: it passes exactly what single step passes
    assert s["differences"]["learned - single"]["diff"] == 0.0


class TextReader(ShapeWorldController):
    """Verifies each (prompt, history) once from the canvas, then answers from memory: it stops reading images."""

    def __init__(self):
        super().__init__()
        self.memo = {}

    def verify(self, prompt, plan, canvas, history):
        key = (prompt, len(history))
        if key not in self.memo:
            self.memo[key] = super().verify(prompt, plan, canvas, history)
        return self.memo[key]


def test_a_verifier_that_does_not_read_the_canvas_is_caught_by_the_swapped_canvases(tmp_path):
    """Right on every real canvas (the memo was made from it), wrong where another prompt's canvas contradicts it."""
    s = eval_controller(TextReader(), "text", n=12, calls_n=12, seed=3, out_dir=tmp_path, progress=False)
    c = s["calls"]
    assert c["verify_constraint_agreement"] == 1.0
    assert c["verify_swapped_agreement"] == c["verify_swapped_text_only"] < 0.85
    assert c["verify_unchanged_by_swap"] == 1.0
    assert "another prompt's canvas" in (tmp_path / "table.md").read_text()


def test_cli_rejects_more_call_prompts_than_prompts(tmp_path):
    from clvr_agent.cli.eval import eval_app

    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    res = CliRunner().invoke(app, ["eval", "controller", "--controller", "shapeworld", "--n", "3", "--calls-n", "5",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--calls-n 5 is more than --n 3" in res.output
