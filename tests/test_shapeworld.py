"""ShapeWorld: detector accuracy on renders, the prompt and edit languages, the executor's seeds and
edits, and the controller's information barrier (pixels and prompt text only)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from clvr_agent.eval.rules import TAGS, evaluate_image
from clvr_agent.protocols import Controller, Executor
from clvr_agent.tools.shapeworld import controller as controller_module
from clvr_agent.tools.shapeworld.controller import ShapeWorldController, repair_ops
from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
from clvr_agent.tools.shapeworld.language import (
    count_constraints,
    format_instruction,
    format_prompt,
    geneval_line,
    geneval_lines,
    parse_instruction,
    parse_prompt,
    tier_line,
)
from clvr_agent.tools.shapeworld.render import render
from clvr_agent.tools.shapeworld.world import CLASSES, PALETTE, Obj, Scene, WorldConfig, box_gap, layout
from clvr_agent.types import ExecutorRequest

COLORS = list(PALETTE)


def _iou(a, b):
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _varied_scene(i: int, rng: np.random.Generator) -> list[Obj]:
    """1-6 random objects, plus (every other scene) one touching the first on its right."""
    specs = [(CLASSES[rng.integers(6)], COLORS[rng.integers(10)], j) for j in range(int(rng.integers(1, 7)))]
    objs = layout(specs, [], rng)
    a = objs[0]
    if i % 2 == 0:
        size = float(rng.uniform(24, 40))
        b = Obj(CLASSES[rng.integers(6)], COLORS[(COLORS.index(a.color) + 1 + rng.integers(9)) % 10],
                a.x0 + a.size, a.y0 + float(rng.uniform(-4, 4)), size, shade=float(rng.uniform(0.88, 1.08)),
                gradient=float(rng.uniform(-0.06, 0.06)))
        inside = b.box[2] < 255 and b.box[1] > 0 and b.box[3] < 255
        if inside and all(box_gap(b.box, o.box) >= (4 if o.color == b.color else 0) for o in objs[1:]):
            objs.append(b)
    return objs


def test_detector_is_right_on_99_percent_of_objects():
    rng = np.random.default_rng(0)
    total = right = touching = 0
    for i in range(200):
        objs = _varied_scene(i, rng)
        touching += any(box_gap(a.box, b.box) < 0.5 for a in objs for b in objs if a is not b)
        dets = detect(render(Scene(objs, noise_seed=i)))
        used: set[int] = set()
        for o in objs:
            total += 1
            hits = [k for k, d in enumerate(dets) if k not in used and _iou(d.box, o.box) > 0.8]
            if hits and dets[hits[0]].cls == o.cls and dets[hits[0]].color == o.color:
                right += 1
                used.add(hits[0])
        assert len(dets) <= len(objs) + 1  # no spurious fragments to speak of
    assert touching >= 50
    assert total >= 500
    assert right / total >= 0.99


def test_detector_scores_pass_the_counting_threshold():
    rng = np.random.default_rng(1)
    scores = [d.score for i in range(30) for d in detect(render(Scene(_varied_scene(i, rng), noise_seed=i)))]
    assert np.mean(np.array(scores) > 0.9) >= 0.99


def test_render_detect_round_trip_is_stable():
    obj = Obj("triangle", "black", 50.4, 60.7, 47.7, shade=1.05)
    objs = [obj]
    for _ in range(8):  # read back and re-render, as every edit does
        d = detect(render(Scene(objs)))
        assert len(d) == 1 and d[0].cls == "triangle" and d[0].color == "black"
        x0, y0, x1, y1 = d[0].box
        objs = [Obj(d[0].cls, d[0].color, x0, y0, x1 - x0)]
    assert np.allclose(objs[0].box, obj.box, atol=1.5)


def test_render_is_antialiased_and_sized():
    image = render(Scene([Obj("circle", "red", 100.3, 80.6, 50.0)]))
    assert image.size == (256, 256) and image.mode == "RGB"
    row = np.asarray(image)[105, 95:110, 1].astype(int)  # green channel across the left edge
    assert len(set(row.tolist())) > 3  # intermediate values, not a hard step


# ---------------------------------------------------------------- language


@pytest.mark.parametrize("tag", TAGS)
def test_geneval_prompts_round_trip(tag):
    rng = np.random.default_rng(3)
    for _ in range(20):
        line = geneval_line(tag, rng)
        assert line["tag"] == tag
        assert parse_prompt(line["prompt"]) == line
        assert format_prompt(line) == line["prompt"]


def test_geneval_phrasing_matches_the_benchmark():
    line = parse_prompt("a photo of a blue star left of a green square")
    assert line["include"] == [{"class": "square", "count": 1, "color": "green"},
                               {"class": "star", "count": 1, "color": "blue", "position": ["left of", 0]}]
    assert parse_prompt("a photo of two circles") == {
        "tag": "counting", "prompt": "a photo of two circles", "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}], "tier": 3}
    assert parse_prompt("a photo of a cross right of a circle")["tag"] == "position"
    assert parse_prompt("a photo of an orange circle and a red triangle")["tag"] == "color_attr"
    with pytest.raises(ValueError, match="cannot parse"):
        parse_prompt("a photo of a dog")
    with pytest.raises(ValueError, match="number"):
        parse_prompt("a photo of two circle")


@pytest.mark.parametrize("tier", range(1, 11))
def test_tier_prompts_have_exactly_tier_constraints(tier):
    rng = np.random.default_rng(tier)
    kinds = set()
    for _ in range(15):
        line = tier_line(tier, rng)
        assert line["tier"] == tier == count_constraints(line)
        assert parse_prompt(line["prompt"]) == line
        kinds |= {k for c in line["include"] for k in ("color", "position") if k in c}
    if tier >= 5:
        assert kinds == {"color", "position"}  # mixed constraint types


def test_generators_are_seeded():
    assert geneval_lines(12, 5) == geneval_lines(12, 5)
    assert geneval_lines(12, 5) != geneval_lines(12, 6)
    assert [line["tag"] for line in geneval_lines(6, 0)] == list(TAGS)


def test_instruction_language_round_trip():
    text = ("add a red circle left of the blue square; remove two green stars; recolor the circle to red; "
            "move a star above the square; redraw: a photo of two circles")
    ops = parse_instruction(text)
    assert [op.kind for op in ops] == ["add", "remove", "recolor", "move", "redraw"]
    assert ops[0].target.color == "red" and ops[0].relation == "left of" and ops[0].reference.cls == "square"
    assert ops[1].target.count == 2 and ops[2].target.count is None and ops[2].color == "red"
    assert format_instruction(ops) == text
    with pytest.raises(ValueError):
        parse_instruction("paint everything red")
    with pytest.raises(ValueError):
        parse_instruction("move the circle")


# ---------------------------------------------------------------- executor


def _request(instruction, seed=0, mode="generate", prompt="a photo of a circle"):
    return ExecutorRequest(mode=mode, instruction=instruction, accumulated_prompt=prompt, seed=seed)


def test_executor_implements_the_protocol_and_is_seeded():
    ex = ShapeWorldExecutor()
    assert isinstance(ex, Executor)
    prompt = "a photo of two red circles left of a blue square"
    a = ex.generate(_request(prompt, seed=7), [])
    b = ex.generate(_request(prompt, seed=7), [])
    c = ex.generate(_request(prompt, seed=8), [])
    assert a.nfe == 1
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    # An edit request whose instruction is a redraw draws afresh, the same way.
    d = ex.generate(_request("redraw: " + prompt, seed=7, mode="edit"), [c.image])
    assert {x.cls for x in detect(d.image)} <= {"circle", "square"} | set(CLASSES)


def test_single_step_errors_grow_with_complexity():
    ex = ShapeWorldExecutor()
    simple = [parse_prompt("a photo of a circle")] * 60
    hard = [tier_line(10, np.random.default_rng(i)) for i in range(60)]

    def rate(lines):
        return np.mean([evaluate_image(line, detect(ex.generate(_request(line["prompt"], seed=i), []).image))[0]
                        for i, line in enumerate(lines)])

    assert rate(simple) >= 0.9
    assert rate(hard) <= 0.2


def _exact():
    return ShapeWorldExecutor(WorldConfig(edit_success=1.0, edit_disturb=0.0))


def _scene_image(*objs):
    return render(Scene(list(objs)))


def test_edit_ops_apply_to_the_pixels():
    ex = _exact()
    base = _scene_image(Obj("square", "blue", 120, 100, 40), Obj("circle", "green", 30, 30, 30))

    def edit(instruction, image=base):
        out = ex.generate(_request(instruction, mode="edit"), [image])
        return [(d.cls, d.color) for d in detect(out.image)], out

    found, _ = edit("add two red stars")
    assert found.count(("star", "red")) == 2 and ("square", "blue") in found
    found, _ = edit("remove a circle")
    assert found == [("square", "blue")]
    found, _ = edit("recolor the circle to yellow")
    assert sorted(found) == [("circle", "yellow"), ("square", "blue")]
    _, out = edit("move the circle right of the square")
    boxes = {d.cls: d.box for d in detect(out.image)}
    from clvr_agent.eval.rules import relative_position

    assert "right of" in relative_position(boxes["circle"], boxes["square"])
    _, out = edit("add a purple cross below the square")
    dets = detect(out.image)
    cross = next(d for d in dets if d.cls == "cross")
    square = next(d for d in dets if d.cls == "square")
    assert cross.color == "purple" and "below" in relative_position(cross.box, square.box)


def test_edit_ops_fail_with_probability():
    ex = ShapeWorldExecutor(WorldConfig(edit_success=0.0, edit_disturb=0.0))
    base = _scene_image(Obj("square", "blue", 120, 100, 40))
    out = ex.generate(_request("add a red star", mode="edit"), [base])
    assert [(d.cls, d.color) for d in detect(out.image)] == [("square", "blue")]
    assert out.info["applied"] == [False]


# ---------------------------------------------------------------- controller


def test_controller_module_never_imports_the_executor():
    tree = ast.parse(Path(controller_module.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.endswith(("executor", "render", "registry")) for m in modules)


def test_plan_is_the_clause_checklist():
    ctl = ShapeWorldController()
    assert isinstance(ctl, Controller)
    plan = ctl.plan("a photo of two red circles left of a blue square")
    assert plan.first_instruction == "a photo of two red circles left of a blue square"
    assert [(c.id, c.kind) for c in plan.constraints] == [("c0", "color"), ("c1", "relation"), ("x0", "absence")]


def test_verify_judges_pixels_rendered_without_the_executor():
    ctl = ShapeWorldController()
    prompt = "a photo of a blue star left of a green square"
    plan = ctl.plan(prompt)
    good = _scene_image(Obj("star", "blue", 20, 100, 40), Obj("square", "green", 160, 100, 40))
    v = ctl.verify(prompt, plan, good, [])
    assert v.satisfied and v.score == 1.0
    swapped = _scene_image(Obj("star", "blue", 160, 100, 40), Obj("square", "green", 20, 100, 40))
    v = ctl.verify(prompt, plan, swapped, [])
    assert not v.satisfied and v.score == 0.5
    assert [c.satisfied for c in v.constraints] == [True, False]


def test_correct_writes_the_smallest_fix_and_it_works():
    ctl, ex = ShapeWorldController(), _exact()
    prompt = "a photo of two red circles left of a blue square"
    plan = ctl.plan(prompt)
    canvas = _scene_image(Obj("circle", "red", 20, 100, 30), Obj("square", "blue", 170, 100, 40))
    verdict = ctl.verify(prompt, plan, canvas, [])
    assert not verdict.satisfied
    fix = ctl.correct(prompt, plan, verdict, canvas, [])
    assert fix.mode == "edit" and fix.instruction == "add a red circle left of the square"
    after = ex.generate(_request(fix.instruction, mode="edit", prompt=prompt), [canvas]).image
    assert ctl.check_step(fix.instruction, canvas, after).executed
    assert ctl.verify(prompt, plan, after, []).satisfied


def test_correct_chains_ops_for_several_failing_clauses():
    ctl, ex = ShapeWorldController(), _exact()
    prompt = "a photo of three green crosses, a red square and a star"
    plan = ctl.plan(prompt)
    canvas = _scene_image(Obj("cross", "green", 10, 10, 30), Obj("cross", "blue", 60, 10, 30),
                          Obj("cross", "green", 110, 10, 30), Obj("cross", "green", 160, 10, 30),
                          Obj("square", "red", 100, 150, 40))
    fix = ctl.correct(prompt, plan, ctl.verify(prompt, plan, canvas, []), canvas, [])
    assert fix.instruction == "remove a blue cross; add a star"
    after = ex.generate(_request(fix.instruction, mode="edit", prompt=prompt), [canvas]).image
    assert ctl.verify(prompt, plan, after, []).satisfied


def test_correct_redraws_when_most_clauses_fail():
    ctl = ShapeWorldController()
    prompt = "a photo of a red circle and a blue square"
    plan = ctl.plan(prompt)
    canvas = _scene_image(Obj("star", "green", 10, 10, 30))
    fix = ctl.correct(prompt, plan, ctl.verify(prompt, plan, canvas, []), canvas, [])
    assert fix.mode == "generate" and fix.instruction == f"redraw: {prompt}"


def test_check_step_sees_an_edit_that_did_not_happen():
    ctl = ShapeWorldController()
    before = _scene_image(Obj("square", "blue", 120, 100, 40))
    failed = ShapeWorldExecutor(WorldConfig(edit_success=0.0, edit_disturb=0.0))
    after = failed.generate(_request("add a red star", mode="edit"), [before]).image
    assert not ctl.check_step("add a red star", before, after).executed
    after = _exact().generate(_request("add a red star", mode="edit"), [before]).image
    assert ctl.check_step("add a red star", before, after).executed


def test_repair_ops_need_only_detections():
    from clvr_agent.eval.rules import Detection

    line = parse_prompt("a photo of a cross right of a circle")
    dets = [Detection("circle", (100, 100, 140, 140), 0.99, "red"), Detection("cross", (10, 100, 50, 140), 0.99, "red")]
    assert format_instruction(repair_ops(line, dets)) == "move the cross right of the circle"


def test_plan_rejects_prompts_outside_the_world():
    from clvr_agent.errors import ControllerOutputError

    with pytest.raises(ControllerOutputError):
        ShapeWorldController().plan("a watercolour of a lighthouse")


# ---------------------------------------------------------------- benchmarks on files


def test_eval_writes_geneval_layout_and_score_folder_agrees(tmp_path):
    import json

    from clvr_agent.eval.shapeworld import eval_shapeworld, score_folder

    summary = eval_shapeworld("single", n=12, seed=3, out_dir=str(tmp_path / "ev"), progress=False)
    assert set(summary["per_tag"]) == set(TAGS) and summary["mean_iterations"] == 1.0
    assert (tmp_path / "ev" / "00000" / "samples" / "0000.png").is_file()
    assert (tmp_path / "ev" / "summary.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert {"tag", "tier", "prompt", "passed", "iterations"} <= set(rows[0])
    scored = score_folder(str(tmp_path / "ev"), str(tmp_path / "sc"))
    assert scored["overall"] == pytest.approx(summary["overall"])
    official = [json.loads(x) for x in (tmp_path / "sc" / "results.jsonl").read_text().splitlines()]
    assert {"filename", "tag", "prompt", "correct", "reason"} <= set(official[0])
    assert [r["correct"] for r in official] == [r["passed"] for r in rows]


def test_counts_past_ten_round_trip_as_digits():
    from clvr_agent.tools.shapeworld.language import NP, parse_np

    np_ = NP("star", 15, "pink")
    assert np_.text() == "15 pink stars" and parse_np(np_.text()) == np_
    assert parse_np("three red circles") == NP("circle", 3, "red")


def test_loop_stops_asking_for_edits_the_executor_cannot_carry_out():
    # An executor whose edits never take (a base model never trained to edit): once the passive
    # check has failed an edit through all its retries, every further correction is a fresh draw.
    from clvr_agent.app.api import create_clvr

    broken = ShapeWorldExecutor(WorldConfig(eps_per_constraint=0.6, eps_max=0.9, edit_success=0.0, edit_disturb=0.0))
    out = create_clvr(broken, max_iterations=6, patience=6).invoke({"prompt": "a photo of a red circle left of a blue square", "seed": 3})
    steps = out["trajectory"]["steps"]
    stuck = [i for i, s in enumerate(steps) if s["accepted"] and s["request"]["mode"] == "edit"
             and not s["passive"]["executed"]]
    assert stuck, [(s["request"]["mode"], s["instruction"]) for s in steps]
    later = [s for s in steps[stuck[0] + 1:] if s["request"]["mode"] != "inpaint"]
    assert later and all(s["request"]["mode"] == "generate" and s["instruction"].startswith("redraw:") for s in later)
    # It tried one object drawn into a clear tile first (this executor fails those too), then only redraws.
    tiles = [s for s in steps if s["request"]["mode"] == "inpaint"]
    assert tiles and all(s["request"]["region_prompt"].startswith("a photo of a") for s in tiles)
    assert steps.index(tiles[-1]) < steps.index(later[0])
    assert out["trajectory"]["iterations"] > 2  # it kept trying rather than repeating a dead edit


def test_region_draws_off_never_asks_for_a_region_draw():
    # The same executor and prompt as above, where the default controller asks for tiles after the
    # failed edit: with region_draws=False every later correction is a redraw (how learned rows are measured).
    from clvr_agent.app.api import create_clvr

    broken = ShapeWorldExecutor(WorldConfig(eps_per_constraint=0.6, eps_max=0.9, edit_success=0.0, edit_disturb=0.0))
    runnable = create_clvr(broken, controller="shapeworld", controller_options={"region_draws": False},
                           max_iterations=6, patience=6)
    out = runnable.invoke({"prompt": "a photo of a red circle left of a blue square", "seed": 3})
    steps = out["trajectory"]["steps"]
    stuck = [i for i, s in enumerate(steps) if s["accepted"] and s["request"]["mode"] == "edit"
             and not s["passive"]["executed"]]
    assert stuck and not any(s["request"]["mode"] == "inpaint" or s["request"].get("region_prompt") for s in steps)
    later = steps[stuck[0] + 1:]
    assert later and all(s["request"]["mode"] == "generate" and s["instruction"].startswith("redraw:") for s in later)


def test_cli_region_draws_flag(tmp_path):
    from typer.testing import CliRunner

    from clvr_agent.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "shapeworld", "--mode", "loop", "--n", "2", "--no-region-draws",
                              "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    import json

    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["controller_options"] == {"region_draws": False} and summary["n"] == 2
    bad = runner.invoke(app, ["generate", "a photo of a red circle", "--controller", "chat-model", "--base-url",
                              "http://x", "--no-region-draws", "--out", str(tmp_path / "g")])
    assert bad.exit_code == 2 and "ShapeWorld controller" in bad.output


def test_clear_tile_leaves_every_object_alone_and_keeps_the_relation():
    from clvr_agent.eval.rules import relative_position
    from clvr_agent.tools.shapeworld.controller import TILE_FILL, clear_tile
    from clvr_agent.tools.shapeworld.language import NP, Op

    dets = detect(_scene_image(Obj("circle", "red", 78, 78, 100)))  # a big circle in the middle
    op = Op("add", NP("square", 1, "blue"), "right of", NP("circle", None, None))
    tile = clear_tile(op, dets, (256, 256))
    assert tile is not None and tile.x1 - tile.x0 == tile.y1 - tile.y0 >= 40
    (circle,) = [d.box for d in dets]
    assert box_gap((tile.x0, tile.y0, tile.x1, tile.y1), circle) >= 1  # pasting it cannot clip the circle
    inset = (tile.x1 - tile.x0) * (1 - TILE_FILL) / 2
    inner = (tile.x0 + inset, tile.y0 + inset, tile.x1 - inset, tile.y1 - inset)
    assert "right of" in relative_position(inner, circle)
    crowded = detect(_scene_image(Obj("circle", "red", 8, 8, 240)))  # no room anywhere
    assert clear_tile(Op("add", NP("square", 1, None)), crowded, (256, 256)) is None
