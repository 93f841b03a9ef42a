"""PPRL as the paper describes it: the ShapeWorld proxy teacher, R_text / R_ref, loop states from a synth
folder, PPO epochs (the clip matters), the KL to the reference model, the held-out reward curve, the CLI.

The trainer runs on the tiny real-class FLUX.2 [klein]; each test builds a private pipeline (training
mutates it). The teacher and rewards are judged on hand-made ShapeWorld canvases.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from clvr_agent.tools.shapeworld.render import render
from clvr_agent.tools.shapeworld.world import Obj, Scene
from clvr_agent.training.pprl_data import LoopState, ProxyPrompt, load_loop_states, plain_proxy, split_heldout

from tests._pprl import SEQ, H, W, brightness, pprl_config

CIRCLE, SQUARE, STAR = (30, 100, 50), (170, 100, 50), (100, 20, 40)  # x0, y0, size on the 256 px canvas
USER = "a photo of a red circle, a blue square and a green star"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene(circle=CIRCLE, star=True, circle_color="red"):
    objs = [Obj("circle", circle_color, *circle), Obj("square", "blue", *SQUARE)]
    if star:
        objs.append(Obj("star", "green", *STAR))
    return render(Scene(objects=objs, noise_seed=7))


def _centre(box):
    x0, y0, s = box
    return int(y0 + s / 2), int(x0 + s / 2)


@pytest.fixture()
def canvas(tmp_path):
    path = tmp_path / "canvas.png"
    _scene().save(path)
    return path


def _edit(canvas, instruction):
    return LoopState(prompt=f"{USER}\n{instruction}", instruction=instruction, mode="edit", references=(str(canvas),))


# ------------------------------------------------------------------------------------------ the teacher


@pytest.mark.parametrize("instruction, scene, kept, edited", [
    ("add a yellow triangle left of the blue square",
     "a photo of a red circle, a green star and a yellow triangle left of a blue square", [CIRCLE, SQUARE, STAR], []),
    ("remove the green star", "a photo of a red circle and a blue square", [CIRCLE, SQUARE], [STAR]),
    ("recolor the red circle to purple", "a photo of a purple circle, a green star and a blue square", [SQUARE, STAR], [CIRCLE]),
    ("move the circle right of the blue square", "a photo of a red circle right of a blue square and a green star",
     [SQUARE, STAR], [CIRCLE]),
])
def test_teacher_gives_the_scene_and_the_pixels_to_keep(canvas, instruction, scene, kept, edited):
    from clvr_agent.tools.shapeworld.language import parse_prompt
    from clvr_agent.training.pprl_shapeworld import ShapeWorldTeacher

    proxy = ShapeWorldTeacher()(_edit(canvas, instruction))
    assert proxy.text == scene
    parse_prompt(proxy.text)  # a prompt the R_text judge reads
    assert len(proxy.references) == 1 and proxy.preserve.shape == (256, 256)
    for box in kept:
        assert proxy.preserve[_centre(box)], (instruction, box)
    for box in edited:
        assert not proxy.preserve[_centre(box)], (instruction, box)
    background = proxy.preserve[245, 10]
    # removing or recolouring keeps the background; adding or moving puts objects into free space
    assert background == (instruction.split()[0] in ("remove", "recolor"))


def test_teacher_on_text_to_image_steps_and_the_plain_proxy(canvas):
    from clvr_agent.training.pprl_shapeworld import ShapeWorldTeacher

    teacher = ShapeWorldTeacher()
    first = LoopState(prompt=USER, instruction=USER, mode="generate")
    redraw = LoopState(prompt=f"{USER}\nadd a star\nredraw: {USER}", instruction=f"redraw: {USER}", mode="generate")
    for state in (first, redraw, USER):
        proxy = teacher(state)
        assert (proxy.text, proxy.references, proxy.preserve) == (USER, [], None)
    # the plain proxy is the raw history: all of the last canvas to keep
    plain = plain_proxy(_edit(canvas, "remove the green star"))
    assert plain.text == f"{USER}\nremove the green star" and plain.preserve is None and len(plain.references) == 1
    with pytest.raises(ValueError, match="cannot read the instruction"):
        teacher(_edit(canvas, "make it nicer"))


# ------------------------------------------------------------------------------------------ the rewards


def test_r_ref_ignores_the_edited_region_and_penalises_changes_outside(canvas):
    from clvr_agent.training.pprl import preservation_reward
    from clvr_agent.training.pprl_shapeworld import ShapeWorldTeacher

    proxy = ShapeWorldTeacher()(_edit(canvas, "remove the green star"))
    small = lambda im: im.resize((64, 64), Image.Resampling.BOX)  # noqa: E731  the model's sample size
    same, star_gone = small(_scene()), small(_scene(star=False))
    circle_moved = small(_scene(circle=(30, 180, 50), star=False))
    circle_recoloured = small(_scene(circle_color="purple", star=False))
    r = preservation_reward([same, star_gone, circle_moved, circle_recoloured], [proxy] * 4)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(1.0)  # only the edited region changed
    assert r[2] < 0.97 and r[3] < 0.97  # the circle was to be kept
    # the raw history keeps the whole canvas: the edit itself is penalised
    plain = preservation_reward([star_gone], [plain_proxy(_edit(canvas, "remove the green star"))])[0]
    assert plain < 0.995
    assert preservation_reward([same], [ProxyPrompt(USER)]) == [None]  # no canvas: R_ref does not apply


def test_r_text_scores_the_scene_and_penalises_extra_objects():
    from clvr_agent.training.pprl_shapeworld import shapeworld_reward

    im = _scene()
    scenes = [USER, "a photo of a red circle and a blue square", f"{USER}\nremove the green star"]
    exact, one_extra, history = shapeworld_reward([im] * 3, [ProxyPrompt(s) for s in scenes])
    assert exact == 1.0
    assert one_extra == pytest.approx(2 / 3)  # GenEval passes it ("at least"); the step target does not
    assert history == 1.0  # a raw history is judged on its first line, the user's prompt


# ------------------------------------------------------------------------------------------ loop states


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    from clvr_agent.tools.registry import get_controller, get_executor
    from clvr_agent.training.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(out=str(out), n=8, prompts="geneval", progress=False, max_iterations=4, record_calls=True),
               get_executor("shapeworld"), get_controller("shapeworld"))
    return out


def test_loop_states_are_the_executor_calls_the_loop_made(synth_folder):
    from clvr_agent.types import Correction

    states = load_loop_states(synth_folder)
    edits = [s for s in states if s.mode == "edit"]
    assert edits and any(s.mode == "generate" for s in states)
    # one first draw per prompt tried (the A/B judge's second plan is not an executor call)
    firsts = [s for s in states if s.mode == "generate" and "\n" not in s.prompt]
    assert len(firsts) == len({s.key for s in states}) == 8
    corrections = [json.loads(ln) for f in synth_folder.glob("calls-*.jsonl") for ln in f.read_text().splitlines()]
    corrections = [c for c in corrections if c["task"] == "correct"]
    for s in edits:
        assert s.prompt.split("\n")[-1] == s.instruction and 1 <= len(s.references) <= 3
        assert all(Image.open(p).size == (256, 256) for p in s.references)
    # an edit's last reference is the canvas the controller corrected
    by_instruction = {(c["prompt"], Correction.model_validate_json(c["reply"]).instruction): c["image"]["path"]
                      for c in corrections}
    for s in edits:
        assert s.references[-1] == str(synth_folder / by_instruction[(s.prompt.split("\n")[0], s.instruction)])
    # without recorded calls: the kept trajectories' steps
    for f in synth_folder.glob("calls-*.jsonl"):
        f.rename(f.with_suffix(".bak"))
    try:
        kept = load_loop_states(synth_folder)
    finally:
        for f in synth_folder.glob("calls-*.bak"):
            f.rename(f.with_suffix(".jsonl"))
    assert kept and {s.key for s in kept} < {s.key for s in states}
    train, held = split_heldout(states, 2)
    assert len({s.key for s in held}) == 2 and not {s.key for s in held} & {s.key for s in train}
    with pytest.raises(ValueError, match="keep at least one run"):
        split_heldout(states, 8)


# ------------------------------------------------------------------------------------------ the trainer


def _pipe():
    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    return build_tiny_flux2_klein(distilled=False, seed=0)


def test_ppo_epochs_take_the_policy_off_policy_so_the_clip_acts(tmp_path):
    from clvr_agent.training.pprl import PPRLTrainer

    cfg = pprl_config(tmp_path, ppo_epochs=3, learning_rate=1e-2, clip_range=1e-4)
    tr = PPRLTrainer(_pipe(), cfg, ["a red circle", "a blue square"], brightness)
    rollouts = [tr.rollout(0), tr.rollout(1)]
    tr.advantages(rollouts)
    first = [tr.policy_loss(ro, scale=0.5) for ro in rollouts]
    assert all(torch.equal(s["ratios"], torch.ones_like(s["ratios"])) and s["clip_frac"] == 0.0 for s in first)
    tr.update()
    second = [tr.policy_loss(ro, backward=False) for ro in rollouts]
    assert all((s["ratios"] - 1).abs().max() > cfg.clip_range and s["clip_frac"] > 0 for s in second)

    history = PPRLTrainer(_pipe(), pprl_config(tmp_path / "b", max_steps=2, ppo_epochs=3, learning_rate=1e-2,
                                           clip_range=1e-4), ["a red circle", "a blue square"], brightness).train()
    assert all(h["clip_frac"] > 0 and h["ratio_dev_last"] > 1e-4 for h in history)
    one = PPRLTrainer(_pipe(), pprl_config(tmp_path / "c", max_steps=2, learning_rate=1e-2),
                      ["a red circle", "a blue square"], brightness).train()
    assert all(h["clip_frac"] == 0.0 and h["ratio_mean"] == 1.0 for h in one)  # one epoch: on-policy


@pytest.mark.parametrize("lora_rank, lr", [(4, 1e-2), (0, 1e-3)])
def test_kl_to_the_reference_model_starts_at_zero_and_grows(tmp_path, lora_rank, lr):
    from clvr_agent.training.pprl import PPRLTrainer

    cfg = pprl_config(tmp_path, max_steps=4, lora_rank=lora_rank, learning_rate=lr, kl_coef=0.1, clip_range=1e-2)
    tr = PPRLTrainer(_pipe(), cfg, ["a red circle", "a blue square"], brightness)
    assert (tr.ref_model is None) == (lora_rank > 0)  # LoRA: the disabled adapter; full: a frozen copy
    kl = [h["kl"] for h in tr.train()]
    assert kl[0] == 0.0 and 0 < kl[1] < kl[-1], kl


def test_trainer_conditions_on_the_loop_state_and_logs_a_held_out_curve(tmp_path, synth_folder):
    from clvr_agent.training.pprl import PPRLTrainer, preservation_reward
    from clvr_agent.training.pprl_shapeworld import ShapeWorldTeacher, shapeworld_reward

    train, held = split_heldout(load_loop_states(synth_folder), 2)
    edit = next(i for i, s in enumerate(train) if s.mode == "edit")
    train = [train[edit], next(s for s in train if s.mode == "generate")]
    cfg = pprl_config(tmp_path, max_steps=2, text_weight=0.5, eval_every=1, eval_group_size=2, groups_per_step=2)
    tr = PPRLTrainer(_pipe(), cfg, train, shapeworld_reward, preservation_reward, ShapeWorldTeacher(), heldout=held)
    cond, _ = tr.condition(0)
    assert cond.ref_tokens is not None and cond.ref_tokens.shape[1] == len(train[0].references) * 16
    assert tr.condition(1)[0].ref_tokens is None  # a generate call sees no canvas, as in the loop
    assert tr.proxy(0).preserve is not None and "\n" not in tr.proxy(0).text  # the target is the teacher's
    before = tr.evaluate()["heldout_reward"]
    assert tr.evaluate()["heldout_reward"] == before  # fixed noise: the same weights score the same
    tr.heldout_curve.clear()
    history = tr.train()
    curve = json.loads((tmp_path / "pprl" / "heldout.json").read_text())
    assert [c["step"] for c in curve] == [0, 1, 2] and curve[0]["heldout_reward"] == before
    assert all("heldout_reward" in h and "reward_ref" in h for h in history)


def test_pprl_config_and_trainer_errors_say_how_to_fix(tmp_path):
    from clvr_agent.training.pprl import PPRLConfig, PPRLTrainer

    with pytest.raises(ValueError, match="ppo_epochs must be ≥ 1"):
        PPRLConfig(ppo_epochs=0)
    with pytest.raises(ValueError, match="eval_every must be ≥ 0"):
        PPRLConfig(eval_every=-1)
    with pytest.raises(ValueError, match="needs held-out contexts"):
        PPRLTrainer(_pipe(), pprl_config(tmp_path, eval_every=2), ["a red circle"], brightness)
    with pytest.raises(ValueError, match="set eval_every"):
        PPRLTrainer(_pipe(), pprl_config(tmp_path), ["a red circle"], brightness, heldout=["a blue square"])
    with pytest.raises(ValueError, match="pass one"):
        PPRLTrainer(_pipe(), pprl_config(tmp_path, text_weight=0.5), ["a red circle"], brightness)
    with pytest.raises(ValueError, match="drop region draws"):
        LoopState(prompt="a", mode="inpaint")


def test_cli_pprl_on_a_synth_folder_proxy_and_plain(tmp_path, synth_folder):
    from typer.testing import CliRunner

    from clvr_agent.cli.train import train_app

    model = tmp_path / "model"
    _pipe().save_pretrained(model)
    args = ["pprl", "--model", str(model), "--prompts", str(synth_folder), "--height", str(H), "--width", str(W),
            "--max-sequence-length", str(SEQ), "--num-steps", "3", "--group-size", "2", "--groups-per-step", "1",
            "--lora-rank", "4", "--max-steps", "1", "--text-weight", "0.8", "--eval-every", "1",
            "--eval-group-size", "1", "--ppo-epochs", "2", "--kl-coef", "0.01"]
    runner = CliRunner()
    curves = {}
    for proxy in ("shapeworld", "plain"):
        res = runner.invoke(train_app, args + ["--heldout-runs", "6", "--out", str(tmp_path / proxy), "--proxy", proxy])
        assert res.exit_code == 0, res.output
        curves[proxy] = json.loads((tmp_path / proxy / "heldout.json").read_text())
        assert json.loads((tmp_path / proxy / "training_args.json").read_text())["ppo_epochs"] == 2
    # both runs are scored against the teacher's targets: the same model at step 0 scores the same
    assert curves["shapeworld"][0] == curves["plain"][0]
    bad = runner.invoke(train_app, args + ["--heldout-runs", "6", "--out", str(tmp_path / "x"), "--proxy", "vlm"])
    assert bad.exit_code == 2 and "--proxy 'vlm'" in bad.output
    bad = runner.invoke(train_app, args + ["--out", str(tmp_path / "y")])  # a curve needs held-out runs
    assert bad.exit_code == 2 and "--heldout-runs" in bad.output
