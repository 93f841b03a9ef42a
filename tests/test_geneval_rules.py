"""GenEval's pass rules, each pinned with hand-written detections."""

from __future__ import annotations

import pytest

from clvr_agent.eval.rules import (
    Detection,
    clause_scores,
    evaluate_image,
    load_object_names,
    load_official_metadata,
    partial_score,
    relative_position,
    summarize,
)


def det(cls, box=(0, 0, 10, 10), score=0.95, color=None):
    return Detection(cls=cls, box=tuple(float(v) for v in box), score=score, color=color)


def line(tag, include, exclude=None):
    out = {"tag": tag, "prompt": "p", "include": include}
    if exclude:
        out["exclude"] = exclude
    return out


# ---------------------------------------------------------------- confidence thresholds


def test_threshold_is_strictly_above_0_3():
    meta = line("single_object", [{"class": "dog", "count": 1}])
    assert evaluate_image(meta, [det("dog", score=0.31)]) == (True, "")
    assert evaluate_image(meta, [det("dog", score=0.3)]) == (False, "expected dog>=1, found 0")


def test_counting_tag_uses_0_9_threshold():
    include = [{"class": "dog", "count": 2}]
    dets = [det("dog", score=0.95), det("dog", (20, 0, 30, 10), score=0.85)]
    assert evaluate_image(line("counting", include), dets) == (False, "expected dog>=2, found 1")
    # The same detections pass any other task, whose threshold is 0.3.
    assert evaluate_image(line("two_object", include), dets)[0]
    # 0.9 itself is not above the threshold.
    assert not evaluate_image(line("counting", include), [det("dog", score=0.9), det("dog", score=0.95)])[0]


def test_counting_exclude_ignores_low_confidence_extras():
    meta = line("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    dets = [det("cat", score=0.99), det("cat", score=0.98), det("cat", score=0.5)]
    assert evaluate_image(meta, dets) == (True, "")


def test_at_most_16_detections_per_class():
    meta = line("single_object", [{"class": "dog", "count": 1}], [{"class": "dog", "count": 17}])
    dets = [det("dog", score=0.5 + i / 100) for i in range(20)]
    assert evaluate_image(meta, dets) == (True, "")  # 20 detected, 16 kept, 16 < 17
    meta16 = line("single_object", [{"class": "dog", "count": 1}], [{"class": "dog", "count": 16}])
    assert evaluate_image(meta16, dets) == (False, "expected dog<16, found 16")


def test_other_classes_do_not_interfere():
    meta = line("single_object", [{"class": "dog", "count": 1}])
    assert evaluate_image(meta, [det("cat"), det("dog")])[0]
    assert not evaluate_image(meta, [det("cat")])[0]


# ---------------------------------------------------------------- colour


def test_colour_judged_on_top_count_by_score():
    meta = line("colors", [{"class": "car", "count": 1, "color": "red"}])
    red_low = [det("car", score=0.5, color="red"), det("car", score=0.9, color="blue")]
    correct, reason = evaluate_image(meta, red_low)
    assert not correct
    assert reason == "expected red car>=1, found 0 red; and 1 blue"
    red_high = [det("car", score=0.9, color="red"), det("car", score=0.5, color="blue")]
    assert evaluate_image(meta, red_high) == (True, "")


def test_colour_needs_count_matches_among_selected():
    meta = line("counting", [{"class": "car", "count": 2, "color": "red"}])
    dets = [det("car", score=0.99, color="red"), det("car", score=0.98, color="blue"),
            det("car", score=0.97, color="red")]
    correct, reason = evaluate_image(meta, dets)
    assert not correct
    assert reason == "expected red car>=2, found 1 red; and 1 red, 1 blue"


def test_colour_classifier_sees_only_selected_crops():
    meta = line("colors", [{"class": "car", "count": 1, "color": "green"}])
    dets = [det("car", (0, 0, 5, 5), score=0.9), det("car", (50, 50, 60, 60), score=0.4)]
    seen = []

    def classify(d):
        seen.append(d.box)
        return "green"

    assert evaluate_image(meta, dets, classify_color=classify) == (True, "")
    assert seen == [(0.0, 0.0, 5.0, 5.0)]


def test_detector_colour_wins_over_classifier():
    meta = line("colors", [{"class": "car", "count": 1, "color": "green"}])
    assert not evaluate_image(meta, [det("car", color="pink")], classify_color=lambda d: "green")[0]


def test_missing_colour_without_classifier_fails_loudly():
    meta = line("colors", [{"class": "car", "count": 1, "color": "green"}])
    with pytest.raises(ValueError, match="classify_color"):
        evaluate_image(meta, [det("car")])


# ---------------------------------------------------------------- position


def test_relative_position_basic_directions():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}


def test_shrink_removes_relation_of_overlapping_boxes():
    # offset (-5, 0); shrink 0.1 * (100 + 100) = 20 per x, so every revised component is 0.
    assert relative_position((0, 0, 100, 10), (5, 0, 105, 10)) == set()
    # Narrow boxes with the same offset keep the relation: the shrink is what removed it.
    assert relative_position((0, 0, 10, 10), (5, 0, 15, 10)) == {"left of"}


def test_shrink_keeps_sign_and_normalises_by_unrevised_offset():
    # offset (-10, -8), dims (40, 40): revised (-6, -4); / |(-10, -8)| = 12.81 -> (-0.47, -0.31): no relation.
    # (Dividing by the revised norm would give -0.83, i.e. "left of".)
    assert relative_position((0, 0, 20, 20), (10, 8, 30, 28)) == set()
    # offset (-10, 0), dims 40 -> revised -6 / 10 = -0.6: left of.
    assert relative_position((0, 0, 20, 20), (10, 0, 30, 20)) == {"left of"}


def test_position_rule_against_every_target():
    meta = line("position", [{"class": "tree", "count": 1},
                             {"class": "dog", "count": 1, "position": ["left of", 0]}])
    assert evaluate_image(meta, [det("tree", (50, 0, 60, 10)), det("dog", (0, 0, 10, 10))]) == (True, "")
    correct, reason = evaluate_image(meta, [det("tree", (0, 0, 10, 10)), det("dog", (50, 0, 60, 10))])
    assert not correct and reason == "expected dog left of target, found right of target"


def test_position_with_no_relation_reports_empty():
    meta = line("position", [{"class": "tree", "count": 1},
                             {"class": "dog", "count": 1, "position": ["left of", 0]}])
    correct, reason = evaluate_image(meta, [det("tree", (0, 0, 100, 10)), det("dog", (5, 0, 105, 10))])
    assert not correct and reason == "expected dog left of target, found  target"


def test_position_every_selected_subject_must_hold():
    meta = line("composite", [{"class": "tree", "count": 1},
                              {"class": "dog", "count": 2, "position": ["left of", 0]}])
    tree = det("tree", (100, 0, 110, 10))
    good = [tree, det("dog", (0, 0, 10, 10)), det("dog", (20, 0, 30, 10))]
    assert evaluate_image(meta, good)[0]
    bad = [tree, det("dog", (0, 0, 10, 10)), det("dog", (200, 0, 210, 10))]
    assert not evaluate_image(meta, bad)[0]


def test_position_without_target_fails():
    meta = line("position", [{"class": "tree", "count": 1},
                             {"class": "dog", "count": 1, "position": ["left of", 0]}])
    correct, reason = evaluate_image(meta, [det("dog")])
    assert not correct
    assert reason == "expected tree>=1, found 0\nno target for dog to be left of"


def test_position_target_failing_colour_counts_as_no_target():
    meta = line("composite", [{"class": "tree", "count": 1, "color": "green"},
                              {"class": "dog", "count": 1, "position": ["left of", 0]}])
    dets = [det("tree", (50, 0, 60, 10), color="red"), det("dog", (0, 0, 10, 10))]
    assert clause_scores(meta, dets) == [False, False]


# ---------------------------------------------------------------- exclude, clauses, summary


def test_exclude_fails_at_count():
    meta = line("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    two = [det("cup", score=0.99), det("cup", score=0.98)]
    assert evaluate_image(meta, two) == (True, "")
    correct, reason = evaluate_image(meta, two + [det("cup", score=0.97)])
    assert not correct and reason == "expected cup<3, found 3"


def test_clause_scores_and_partial_score():
    meta = line("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    three = [det("cup", score=0.99)] * 3
    assert clause_scores(meta, three) == [True, False]
    assert partial_score(meta, three) == 0.5
    assert partial_score(meta, three[:2]) == 1.0
    assert partial_score(meta, []) == 0.5


def test_all_clauses_true_iff_correct():
    meta = line("color_attr", [{"class": "car", "count": 1, "color": "red"},
                               {"class": "bus", "count": 1, "color": "blue"}])
    for dets in ([det("car", color="red"), det("bus", color="blue")], [det("car", color="red")],
                 [det("car", color="blue"), det("bus", color="blue")]):
        assert all(clause_scores(meta, dets)) == evaluate_image(meta, dets)[0]


def test_summary_overall_is_mean_of_task_means():
    results = [{"tag": "counting", "correct": c} for c in (True, False, False)] + [{"tag": "colors", "correct": True}]
    s = summarize(results)
    assert s["per_tag"] == pytest.approx({"counting": 1 / 3, "colors": 1.0})
    assert s["overall"] == pytest.approx((1 / 3 + 1.0) / 2)  # not the image mean 0.5
    assert list(s["per_tag"]) == ["counting", "colors"]  # order of first occurrence


def test_official_metadata_loads_553_prompts():
    lines = load_official_metadata()
    assert len(lines) == 553
    counts = {}
    for item in lines:
        counts[item["tag"]] = counts.get(item["tag"], 0) + 1
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                      "position": 100, "color_attr": 100}
    assert len(load_object_names()) == 80
