"""The shipped clvr-mini checkpoint: it loads through the ``clvr-mini`` registry backend, draws, and the loop runs on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clvr_agent.tools.flux2_klein import clvr_mini_path
from clvr_agent.types import ExecutorRequest

DRAW, CANVAS = 64, 256  # clvr-mini draws 64 px (clvr_canvas.json) and hands the loop 256 px ShapeWorld canvases
PROMPT = "a photo of a red circle left of a blue square"


@pytest.fixture(scope="module")
def executor():
    from clvr_agent.tools.registry import get_executor

    return get_executor("clvr-mini", torch_dtype="float32", device="cpu")


def test_folder_is_small_safetensors_and_word_level():
    folder = clvr_mini_path()
    weights = list(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "vae", "text_encoder"}
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    assert sum(w.stat().st_size for w in weights) < 50e6
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] in ("Flux2KleinPipeline", "Flux2KleinKVPipeline")


def test_word_level_tokenizer(executor):
    tok = executor.pipe.tokenizer
    pieces = tok.convert_ids_to_tokens(tok(PROMPT).input_ids)
    assert pieces == ["a", "Ġphoto", "Ġof", "Ġa", "Ġred", "Ġcircle", "Ġleft", "Ġof", "Ġa", "Ġblue", "Ġsquare"]
    assert executor.prompt_tokens(PROMPT) <= executor.max_sequence_length


def test_generates_a_canvas_with_exact_nfe(executor):
    req = ExecutorRequest(mode="generate", instruction=PROMPT, accumulated_prompt=PROMPT, seed=3, steps=3)
    out = executor.generate(req, [])
    assert (out.info["width"], out.info["height"]) == (DRAW, DRAW)
    assert out.image.size == (CANVAS, CANVAS)
    assert out.nfe == (3 if executor.is_distilled else 6)  # CFG doubles the transformer calls
    again = executor.generate(req, [])
    assert list(out.image.tobytes()) == list(again.image.tobytes())  # seeded
    assert len(set(out.image.convert("RGB").tobytes())) > 10  # a drawing, not a flat fill


def test_the_loop_on_the_real_model_reports_what_its_final_canvas_shows(executor, tmp_path):
    """Three iterations on the shipped model: every executor call is a real draw (exact NFE, its canvas
    stored) conditioned on the trajectory so far (edits get the earlier canvases), and the run's status is
    the oracle's verdict on the final image it returns (the best canvas, not just the last)."""
    from PIL import Image

    from clvr_agent.app.api import create_clvr
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.types import Trajectory

    runnable = create_clvr("clvr-mini", executor_options={"torch_dtype": "float32", "device": "cpu"},
                           artifact_dir=str(tmp_path), max_iterations=3, steps=3)
    out = runnable.invoke({"prompt": PROMPT, "seed": 2})  # at seed 2 the best canvas is neither the first nor the last
    trajectory = Trajectory.model_validate(out["trajectory"])
    assert trajectory.steps and out["iterations"] == max(s.iteration for s in trajectory.steps)
    for step in trajectory.steps:
        assert step.nfe == (3 if executor.is_distilled else 6) and Path(step.canvas.resolved()).is_file()
        request = step.request  # conditioned on the trajectory: the prompt, every instruction so far, the canvases
        assert request.accumulated_prompt.startswith(PROMPT) and step.instruction in request.accumulated_prompt
        assert request.mode == "generate" or request.references
    with Image.open(out["final_image"]) as im:
        final = im.convert("RGB")
    verdict = ShapeWorldController().verify(PROMPT, trajectory.plan, final, [])
    assert (out["status"] == "satisfied") == verdict.satisfied
    scored = [s for s in trajectory.steps if s.accepted and s.verdict]
    best = max(scored, key=lambda s: s.verdict.score)
    assert best.verdict.score > min(scored[0].verdict.score, scored[-1].verdict.score)  # the choice matters here
    assert verdict.score == best.verdict.score


def _found(executor, prompt: str) -> list:
    """Confident ShapeWorld detections on the executor's seed-0 canvas for ``prompt``."""
    from clvr_agent.eval.rules import THRESHOLD
    from clvr_agent.tools.shapeworld.detect import detect

    out = executor.generate(ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt, seed=0), [])
    return [d for d in detect(out.image.convert("RGB")) if d.score > THRESHOLD]


def test_follows_the_colour_word(executor):
    """The shipped base reads the prompt: at one seed, most colour words come out in that colour.

    A model that ignores the text draws the same canvas for every prompt, so at most the one or two
    colours in it could match; the shipped base gets 9 of 10.
    """
    from clvr_agent.eval.rules import COLORS

    hits = [colour in {d.color for d in _found(executor, f"a photo of a {colour} square")} for colour in COLORS]
    assert sum(hits) >= 8, dict(zip(COLORS, hits))


def test_draws_the_shape_word(executor):
    """The shipped base draws the named shape: at one seed, most "a photo of a {colour} {shape}" prompts
    come back as that shape for the ShapeWorld detector.

    The same canvas for every prompt could show at most one or two of the six classes per colour (a
    colour-only model gets about 2 of 18); the shipped base gets 18.
    """
    from clvr_agent.tools.shapeworld.world import CLASSES

    hits = {f"a photo of a {c} {s}": s in {d.cls for d in _found(executor, f"a photo of a {c} {s}")}
            for c in ("green", "black", "purple") for s in CLASSES}
    assert sum(hits.values()) >= 15, hits


def test_region_draw_adds_the_named_object_where_the_controller_asked(executor):
    """The loop's region correction on the real model: one object drawn alone into a clear tile and
    pasted in, judged by the ShapeWorld controller's passive check (the object is there, in relation).
    The shipped base carries out 5 of these 5 at seed 0..4; a model that ignores the region prompt
    would add the right colour and shape by chance about 1 time in 60."""
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController, clear_tile
    from clvr_agent.tools.shapeworld.detect import detect
    from clvr_agent.tools.shapeworld.language import NP, Op, format_instruction

    ctl, base = ShapeWorldController(), "a photo of a red circle"
    asks = [("blue", "square", "right of"), ("green", "star", "left of"), ("yellow", "triangle", "above"),
            ("black", "cross", "below"), ("purple", "diamond", "right of")]
    done = {}
    for seed, (colour, shape, rel) in enumerate(asks):
        canvas = executor.generate(ExecutorRequest(mode="generate", instruction=base, accumulated_prompt=base, seed=seed), []).image
        op = Op("add", NP(shape, 1, colour), rel, NP("circle", None, None))
        tile = clear_tile(op, detect(canvas), canvas.size)
        assert tile is not None
        instruction = format_instruction([op])
        out = executor.generate(ExecutorRequest(
            mode="inpaint", instruction=instruction, accumulated_prompt=f"{base}\n{instruction}", seed=seed,
            region=tile, region_prompt=f"a photo of a {colour} {shape}"), [canvas])
        assert out.image.size == canvas.size
        done[instruction] = ctl.check_step(instruction, canvas, out.image).executed
    assert sum(done.values()) >= 4, done
