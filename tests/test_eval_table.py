"""`clvr eval table`: bootstrap intervals on hand-made pairs, rows measured part by part and read back,
and the klein row options over a stage folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clvr_agent.eval.stats import independent_bootstrap, paired_bootstrap, paired_units
from clvr_agent.eval.table import Row, Spec, TableConfig, build_table, executor_options
from clvr_agent.tools.registry import register_executor
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
from clvr_agent.tools.shapeworld.world import WorldConfig


def test_paired_bootstrap_on_hand_made_pairs():
    # Two units, differences 1 and 0: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4,
    # so the 95 % percentile interval is [0, 1] around the observed 0.5.
    c = paired_bootstrap([0, 1], [1, 1])
    assert (c["diff"], c["lo"], c["hi"], c["n"]) == (0.5, 0.0, 1.0, 2)
    # Identical rows: every resample differs by exactly 0.
    same = paired_bootstrap([1, 0, 1], [1, 0, 1])
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    # 120 pairs, b wins 6 and loses none: the count of wins resampled is Binomial(120, 0.05), whose 2.5 %
    # and 97.5 % quantiles are 2 and 11; unpaired, the same two rates (0.50 vs 0.55) cannot be told apart.
    a = np.array([1] * 60 + [0] * 60)
    b = a.copy()
    b[60:66] = 1
    paired, unpaired = paired_bootstrap(a, b), independent_bootstrap(a, b)
    assert paired["diff"] == pytest.approx(0.05) == unpaired["diff"]
    assert round(paired["lo"] * 120) in (1, 2, 3) and round(paired["hi"] * 120) in (10, 11, 12)
    assert unpaired["lo"] < 0 < paired["lo"]
    # Large n: the percentile interval is the normal one, mean ± 1.96 sd / √n (0.5 ± 0.0895 here).
    half = paired_bootstrap(np.zeros(120), np.array([0, 1] * 60), resamples=20000)
    assert half["lo"] == pytest.approx(0.5 - 0.0895, abs=0.012) and half["hi"] == pytest.approx(0.5 + 0.0895, abs=0.012)


def test_paired_units_need_the_same_units():
    assert paired_units({"s1/0": 1.0, "s1/1": 0.0}, {"s1/1": 1.0, "s1/0": 1.0}) == ([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same units"):
        paired_units({"s1/0": 1.0}, {"s2/0": 1.0})


def _fake_rows():
    # Same drawing errors (so single step is identical, prompt by prompt), edits that always / never take.
    for name, success in (("sw-edits", 1.0), ("sw-noedits", 0.0)):
        config = WorldConfig(eps_per_constraint=0.15, edit_success=success, edit_disturb=0.0)
        register_executor(name, lambda config=config, **kw: ShapeWorldExecutor(config, **kw))


def test_table_measures_rows_once_and_reports_paired_differences(tmp_path, monkeypatch):
    _fake_rows()
    spec = Spec(rows=[Row("noedits", backend="sw-noedits"), Row("edits", backend="sw-edits"),
                      Row("edits-regions", backend="sw-edits", region_draws=True)],
                probe=["edits"])
    cfg = TableConfig(n=6, seeds=(1, 2), max_iterations=3, edits=3, probe_tiers=(1, 3), per_tier=2)
    table = build_table(spec, tmp_path, cfg, log=lambda _: None)
    for f in ("table.json", "table.md", "table.png", "probe.png"):
        assert (tmp_path / f).is_file()
    rows = table["rows"]
    assert rows["noedits"]["loop"]["n"] == 12 and rows["edits"]["single"]["n"] == 12  # n × seeds, pooled
    assert rows["edits"]["edits"]["overall"] == 1.0 and rows["noedits"]["edits"]["overall"] == 0.0
    assert "colour_shape" not in rows["edits"] and "probe" in rows["edits"] and "probe" not in rows["noedits"]
    assert [rows[n]["region_draws"] for n in rows] == [False, False, True]
    part = json.loads((tmp_path / "edits" / "loop-s2" / "part.json").read_text())
    assert part["settings"]["region_draws"] is False and part["settings"]["seed"] == 2
    # Default comparisons: each row against the one before. Single step draws alike: a difference of
    # exactly 0 on every resample, which only pairing by prompt × seed gives.
    (first, second) = table["compare"]
    assert (first["from"], first["to"], second["from"], second["to"]) == ("noedits", "edits", "edits", "edits-regions")
    assert first["single"]["diff"] == first["single"]["lo"] == first["single"]["hi"] == 0.0
    assert first["loop"]["diff"] >= 0 and first["edits"]["diff"] == 1.0 and first["edits"]["paired"] is False
    assert first["loop"]["n"] == 12 and set(table["loop_minus_single"]) == set(rows)
    md = (tmp_path / "table.md").read_text()
    assert "| noedits → edits |" in md and "Complexity probe" in md and "Edit success per op" in md

    # Read back, not redone: nothing is measured again (a sampler would raise) and the table is the same.
    import clvr_agent.eval.shapeworld as sw

    monkeypatch.setattr(sw, "eval_shapeworld", lambda **kw: pytest.fail("a measured part was redone"))
    again = build_table(spec, tmp_path, cfg, log=lambda _: None)
    assert again["compare"] == table["compare"]
    # Other settings in the same folder are refused, naming what changed.
    with pytest.raises(ValueError, match="other settings.*n"):
        build_table(spec, tmp_path, TableConfig(n=5, seeds=(1, 2), max_iterations=3, edits=3), log=lambda _: None)


def test_spec_is_checked():
    with pytest.raises(ValueError, match="distinct"):
        Spec(rows=[Row("a", backend="shapeworld"), Row("a", backend="shapeworld")])
    with pytest.raises(ValueError, match="compare"):
        Spec(rows=[Row("a", backend="shapeworld")], compare=[("a", "b")])
    with pytest.raises(ValueError, match="folder"):
        Row("a/b")
    with pytest.raises(ValueError, match="model is only read"):
        Row("a", model="x", backend="shapeworld")


def test_klein_row_options_for_a_stage_folder(tmp_path):
    from clvr_agent.tools.flux2_klein import clvr_mini_path

    shipped = executor_options(Row("base"), "cpu")
    assert shipped["model"] == str(clvr_mini_path()) and (shipped["draw_size"], shipped["canvas_size"]) == (64, 256)
    stage = tmp_path / "stage"  # a recipe stage folder: no clvr_canvas.json, so the VAE's native size
    shutil.copytree(clvr_mini_path(), stage, ignore=shutil.ignore_patterns("clvr_canvas.json"))
    native = json.loads((stage / "vae" / "config.json").read_text())["sample_size"]
    opts = executor_options(Row("sft", model=str(stage)), "cpu")
    assert (opts["draw_size"], opts["canvas_size"], opts["model"]) == (native, 256, str(stage))
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        executor_options(Row("x", model=str(tmp_path)), "cpu")


def test_cli_eval_table(tmp_path):
    from typer.testing import CliRunner

    from clvr_agent.cli.main import app

    _fake_rows()
    spec = tmp_path / "rows.json"
    spec.write_text(json.dumps({"rows": [{"name": "a", "backend": "sw-noedits"}, {"name": "b", "backend": "sw-edits"}]}))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "table", "--spec", str(spec), "--out", str(tmp_path / "t"), "--n", "2",
                              "--seeds", "3", "--edits", "1", "--max-iterations", "2"])
    assert res.exit_code == 0, res.output
    assert "| a → b |" in res.output and json.loads((tmp_path / "t" / "table.json").read_text())["config"]["seeds"] == [3]
    spec.write_text(json.dumps({"rows": [{"name": "a", "backend": "sw-edits", "lambda": 1}]}))
    bad = runner.invoke(app, ["eval", "table", "--spec", str(spec), "--out", str(tmp_path / "u")])
    assert bad.exit_code == 2 and "lambda" in bad.output


def _perturbed_copy(src, dst, delta: float):
    """A copy of a pipeline folder whose transformer weights are all shifted by ``delta``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + delta for k, v in load_file(f).items()}, f)
    return dst


def test_dswm_grid_merges_measures_and_picks(tmp_path):
    from safetensors import safe_open

    from clvr_agent.eval.dswm_grid import dswm_grid
    from clvr_agent.tools.flux2_klein import clvr_mini_path

    base = clvr_mini_path()
    aligned = _perturbed_copy(base, tmp_path / "aligned", 0.0)
    distilled = _perturbed_copy(base, tmp_path / "distilled", 0.01)
    cfg = TableConfig(n=1, seeds=(10,), max_iterations=1, edits=0, colour_shape_seeds=0)
    grid = dswm_grid(base, aligned, distilled, tmp_path / "grid", cfg, lambdas_align=(1.0,),
                     lambdas_distill=(0.5, 1.0), log=lambda _: None)
    assert [c["name"] for c in grid["cells"]] == ["a1-d0.5", "a1-d1"]
    folder = tmp_path / "grid" / "a1-d0.5"
    assert (folder / "model_index.json").is_file() and (folder / "merge_report.json").is_file()
    name = "diffusion_pytorch_model.safetensors"
    with safe_open(str(base / "transformer" / name), "pt") as b, \
            safe_open(str(next((folder / "transformer").glob("*.safetensors"))), "pt") as m:
        key = next(iter(b.keys()))
        assert np.allclose(m.get_tensor(key).numpy(), b.get_tensor(key).numpy() + 0.005, atol=1e-6)  # λd · δ
    # the criterion: best loop rate, then single step, then closest to (1, 1)
    cells = grid["cells"]
    want = max(cells, key=lambda c: (c["loop"], c["single"], -abs(c["lambda_distill"] - 1)))
    assert grid["best"]["name"] == want["name"] and (tmp_path / "grid" / "best").resolve() == Path(want["folder"]).resolve()
    assert (tmp_path / "grid" / "selection" / "a1-d1" / "loop-s10" / "part.json").is_file()
    assert "λa \\ λd" in (tmp_path / "grid" / "grid.md").read_text()


def test_cli_dswm_grid_refuses_a_folder_without_a_transformer(tmp_path):
    from typer.testing import CliRunner

    from clvr_agent.cli.main import app

    res = CliRunner().invoke(app, ["eval", "dswm-grid", "--base", str(tmp_path), "--aligned", str(tmp_path),
                                   "--distilled", str(tmp_path), "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "no transformer/ folder" in res.output
