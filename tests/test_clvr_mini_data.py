"""clvr-mini's ShapeWorld training data: text→image pairs, edit triplets, the tag curriculum."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clvr_agent.tools.shapeworld.detect import detect
from clvr_agent.training.clvr_mini_data import DataConfig, write_dataset


def test_pairs_and_edit_examples(tmp_path):
    path = write_dataset(tmp_path, DataConfig(pairs=6, edits=3, size=64, tier_fraction=0.0, seed=3))
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    pairs, edits = recs[:6], recs[6:]
    assert len(edits) == 3 and all(r["tag"] == "edit" for r in edits)
    for r in pairs:
        assert r["references"] == [] and "\n" not in r["prompt"]
        with Image.open(tmp_path / r["target"]) as im:
            assert im.size == (64, 64)
    for r in edits:  # the graph's accumulated prompt: the prompt, a redraw if the loop asked one first, the edit
        lines = r["prompt"].split("\n")
        assert lines[-1] == r["instruction"] and 1 <= len(r["references"]) == len(lines) - 1 <= 2
        assert len(lines) == 2 or lines[1] == f"redraw: {lines[0]}"
        assert r["ops"] and set(r["ops"]) <= {"add", "remove", "recolor", "move"}
        assert all((tmp_path / p).is_file() for p in r["references"] + [r["target"]])


def test_prior_prompts_are_prompts_of_the_tags_without_a_target(tmp_path):
    path = write_dataset(tmp_path, DataConfig(pairs=0, prior_prompts=5, tier_fraction=0.0, tags="two_object,counting", seed=2))
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(recs) == 5 and all(r["prior_only"] and "target" not in r and r["tag"] in ("two_object", "counting") for r in recs)
    assert not list((tmp_path / "img").iterdir())


def test_edit_targets_change_only_what_the_instruction_names():
    """Untouched objects keep their shading and the background its noise: outside the boxes of the
    objects the edit removed, moved or added (+2 px: the renderer's 1 px anti-aliasing patch and the
    box's rounding) the target is the reference, pixel for pixel; and the passive check passes it."""
    import numpy as np

    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.training.clvr_mini_data import edit_example

    rng, controller, cfg = np.random.default_rng(7), ShapeWorldController(), DataConfig(pairs=0, edits=1, edit_error=0.1)
    examples = [e for e in (edit_example(rng, cfg, controller) for _ in range(60)) if e is not None]
    assert len(examples) >= 15 and {"add", "recolor"} <= {k for e in examples for k in e.ops}
    for e in examples:
        a = np.asarray(e.references[-1], dtype=int)
        b = np.asarray(e.target, dtype=int)
        inside = np.zeros(a.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in e.changed:
            inside[max(int(y0) - 2, 0):int(np.ceil(y1)) + 2, max(int(x0) - 2, 0):int(np.ceil(x1)) + 2] = True
        differs = np.abs(a - b).max(axis=-1) > 0
        assert differs.any() and not (differs & ~inside).any(), e.instruction
        assert controller.check_step(e.instruction, e.references[-1], e.target).executed


def test_tags_restrict_the_prompts_and_the_canvases_satisfy_them(tmp_path):
    path = write_dataset(tmp_path, DataConfig(pairs=8, size=256, tier_fraction=0.0, tags="colors", seed=1))
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert {r["tag"] for r in recs} == {"colors"}
    for r in recs:  # "a photo of a <colour> <shape>", drawn exactly: the detector reads that one object back
        colour, shape = r["prompt"].split()[-2:]
        with Image.open(tmp_path / r["target"]) as im:
            dets = detect(im.convert("RGB"))
        assert [(d.color, d.cls) for d in dets] == [(colour, shape)]


@pytest.mark.parametrize("tags", ["", "colors,nonsense"])
def test_bad_tags_fail_loudly(tags):
    with pytest.raises(ValueError, match="tags must be"):
        DataConfig(tags=tags)


def test_object_size_range(tmp_path):
    """clvr-mini's data may draw bigger objects than ShapeWorld's default 24..72 px (more pixels carry the text)."""
    path = write_dataset(tmp_path, DataConfig(pairs=6, size=256, tier_fraction=0.0, tags="colors", min_size=56, max_size=112))
    for r in (json.loads(ln) for ln in path.read_text().splitlines()):
        with Image.open(tmp_path / r["target"]) as im:
            (det,) = detect(im.convert("RGB"))
        side = max(det.box[2] - det.box[0], det.box[3] - det.box[1])
        assert 50 <= side <= 116, (r["prompt"], det.box)


@pytest.mark.parametrize("sizes", [(4, 40), (80, 60), (24, 200)])
def test_bad_size_range_fails_loudly(sizes):
    with pytest.raises(ValueError, match="sizes must satisfy"):
        DataConfig(min_size=sizes[0], max_size=sizes[1])


def test_centre_single_puts_a_lone_object_in_the_middle(tmp_path):
    path = write_dataset(tmp_path, DataConfig(pairs=6, size=256, tier_fraction=0.0, tags="colors,two_object",
                                              centre_single=True, seed=4))
    for r in (json.loads(ln) for ln in path.read_text().splitlines()):
        with Image.open(tmp_path / r["target"]) as im:
            dets = detect(im.convert("RGB"))
        if r["tag"] == "colors":
            (d,) = dets
            cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
            assert abs(cx - 128) < 3 and abs(cy - 128) < 3, d.box
        else:
            assert len(dets) == 2


def test_slots_put_several_objects_on_a_fixed_grid_and_keep_the_prompt_true(tmp_path):
    from clvr_agent.eval.rules import evaluate_image

    path = write_dataset(tmp_path, DataConfig(pairs=16, size=256, tier_fraction=0.0, tags="position,counting,color_attr",
                                              slots=True, min_size=80, max_size=112, seed=5))
    centres = {64, 128, 192, 256 // 6, 256 // 2, 5 * 256 // 6}  # halves, thirds, the middle
    on_grid = 0
    for r in (json.loads(ln) for ln in path.read_text().splitlines()):
        with Image.open(tmp_path / r["target"]) as im:
            dets = detect(im.convert("RGB"))
        line = {"tag": r["tag"], **_line(r["prompt"])}
        assert evaluate_image(line, dets)[0], r["prompt"]
        near = lambda v: min(abs(v - c) for c in centres) <= 3
        on_grid += all(near((d.box[0] + d.box[2]) / 2) and near((d.box[1] + d.box[3]) / 2) for d in dets)
    assert on_grid >= 12  # a scene whose snapped layout would break the prompt keeps its free layout


def test_snap_keeps_order_along_the_main_axis():
    from clvr_agent.tools.shapeworld.world import Obj
    from clvr_agent.training.clvr_mini_data import snap_to_slots

    a, b = Obj("circle", "red", 150, 40, 60), Obj("square", "blue", 20, 90, 60)  # b is left of a
    sa, sb = snap_to_slots([a, b])
    assert sb.x0 + sb.size / 2 == 64 and sa.x0 + sa.size / 2 == 192 and sa.y0 == sb.y0 == 98
    assert snap_to_slots([a]) is None


def _line(prompt: str) -> dict:
    from clvr_agent.tools.shapeworld.language import parse_prompt

    return parse_prompt(prompt)


def test_cli_flags(tmp_path):
    from clvr_agent.training.clvr_mini_data import main

    main([str(tmp_path), "--pairs", "2", "--size", "32", "--centre-single", "--tags", "colors", "--min-size", "40"])
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 2
