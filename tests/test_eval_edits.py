"""`clvr eval edits`: edit success on the edits the loop asks for, per op, judged by the passive check."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clvr_agent.eval.edits import eval_edits
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
from clvr_agent.tools.shapeworld.world import WorldConfig


@pytest.mark.parametrize("edit_success, want", [(1.0, 1.0), (0.0, 0.0)])
def test_edit_success_follows_the_executor(tmp_path, edit_success, want):
    """An executor that carries out every edit scores 1, one that carries out none scores 0, per op too."""
    executor = ShapeWorldExecutor(WorldConfig(eps_per_constraint=0.15, edit_success=edit_success, edit_disturb=0.0))
    summary = eval_edits(executor, n=12, seed=3, out_dir=tmp_path, progress=False)
    assert summary["n"] == 12 and summary["overall"] == want
    assert all(d["success"] in (None, want) for d in summary["by_op"].values())
    assert summary["by_op"]["add"]["n"] > 0 and summary["prompts_tried"] > 12  # right first canvases ask no edit
    rows = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["executed"] == bool(want) for r in rows)
    assert all(r["references"] == r["redraws"] + 1 for r in rows)  # the first canvas, and a redraw if asked
    assert (tmp_path / "table.md").read_text().count("|") > 20 and (tmp_path / "images").is_dir()


def test_cli_eval_edits(tmp_path):
    from clvr_agent.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "edits", "--n", "4", "--seed", "1", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "all instructions" in res.output and json.loads((tmp_path / "e" / "summary.json").read_text())["n"] == 4
    bad = runner.invoke(app, ["eval", "edits", "--controller", "qwen3-vl", "--vlm", "x", "--out", str(tmp_path / "f")])
    assert bad.exit_code == 2 and "ShapeWorld controller" in bad.output
