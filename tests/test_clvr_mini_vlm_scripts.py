"""The clvr-mini-vlm recipe scripts: the harsher data engine and the checkpoint export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "clvr_mini"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def _synth(folder: Path, *, n: int, seed: int, record_calls: bool = False) -> None:
    """`clvr synth` with the ShapeWorld executor and controller (the teacher) into ``folder``."""
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
    from clvr_agent.training.synth import SynthConfig, synthesize

    synthesize(SynthConfig(out=str(folder), n=n, seed=seed, record_calls=record_calls, progress=False),
               ShapeWorldExecutor(), ShapeWorldController())


def _saved_tiny_vlm(folder: Path, seed: int):
    """A tiny random Qwen3-VL saved as a controller folder (image size 64); returns (model, processor)."""
    from clvr_agent.tools.tiny_vlm import build_tiny_qwen3_vl

    model, processor = build_tiny_qwen3_vl(seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    (folder / "clvr_controller.json").write_text(json.dumps({"image_size": 64}))
    return model, processor


def test_synth_harsh_records_more_failures_than_the_default_executor(tmp_path):

    res = _run(str(SCRIPTS / "synth_harsh.py"), str(tmp_path / "harsh"), "--n", "16", "--seed", "3",
               "--eps", "0.2", "--edit-success", "0.5")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "harsh" / "harsh_executor.json").read_text())["eps_per_constraint"] == 0.2
    _synth(tmp_path / "plain", n=16, seed=3, record_calls=True)

    def unmet(folder: Path) -> float:
        verdicts = [c for f in folder.glob("calls-*.jsonl") for line in f.read_text().splitlines()
                    if (r := json.loads(line))["task"] == "verify" for c in json.loads(r["reply"])["constraints"]]
        return sum(not c["satisfied"] for c in verdicts) / len(verdicts)

    assert unmet(tmp_path / "harsh") > unmet(tmp_path / "plain")
    bad = _run(str(SCRIPTS / "synth_harsh.py"), str(tmp_path / "bad"), "--eps", "1.5")
    assert bad.returncode != 0 and "eps_per_constraint" in bad.stderr


def test_ship_vlm_exports_a_checkpoint_onto_a_shipped_folder(tmp_path):
    """A shipped folder (no init_vlm.py record) is a valid init: same sizes and vocabulary."""
    import torch
    from safetensors.torch import save_file

    init = tmp_path / "shipped"
    model, _ = _saved_tiny_vlm(init, seed=0)
    (init / "clvr_mini_vlm.json").write_text(json.dumps({"step": 7}))
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000012"
    ckpt.mkdir(parents=True)
    trained = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    save_file({n: t.contiguous() for n, t in trained.items()}, str(ckpt / "model.safetensors"))
    res = _run(str(SCRIPTS / "ship_vlm.py"), str(init), str(ckpt), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "out" / "clvr_mini_vlm.json").read_text())
    assert info["step"] == 12 and info["init"] == {"step": 7}
    from clvr_agent.tools.qwen3_vl import load_qwen3_vl

    out, _ = load_qwen3_vl(str(tmp_path / "out"), torch_dtype="float32", device="cpu")
    for n, p in out.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_balance_calls_keeps_every_failure_and_as_many_satisfied_verdicts(tmp_path):
    from clvr_agent.training.sft_vlm import load_calls

    _synth(tmp_path / "syn", n=24, seed=5, record_calls=True)
    res = _run(str(SCRIPTS / "balance_calls.py"), str(tmp_path / "bal"), str(tmp_path / "syn"), "--plans", "3",
               "--correct-repeat", "2")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "bal" / "balance.json").read_text())
    read, written = report["read"], report["written"]
    assert read["verify:met"] > read["verify:unmet"] > 0  # the raw mix is mostly satisfied
    assert written["verify:met"] == written["verify:unmet"] == read["verify:unmet"]
    assert written["check:missed"] == read.get("check:missed", 0) and written["plan"] == 3
    assert written["correct"] == 2 * read["correct"]
    calls = load_calls(tmp_path / "bal")  # sft-vlm reads the folder in place: every image path is absolute and exists
    assert len(calls) == sum(written.values()) and all(Path(c.image.path).is_file() for c in calls if c.image)
    missing = _run(str(SCRIPTS / "balance_calls.py"), str(tmp_path / "b2"), str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "holds no calls-*.jsonl" in missing.stderr


def test_grow_vlm_adds_capacity_without_changing_a_single_logit(tmp_path):
    """Growth is function-preserving on real inputs, and the new units are live (they get gradients)."""
    import torch
    from PIL import Image

    from clvr_agent.tools.qwen3_vl import load_qwen3_vl

    init = tmp_path / "small"
    model, processor = _saved_tiny_vlm(init, seed=1)
    res = _run(str(SCRIPTS / "grow_vlm.py"), str(init), str(tmp_path / "big"), "--vision-depth", "3",
               "--vision-intermediate", "48", "--text-layers", "3", "--text-intermediate", "64",
               "--image-size", "96")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "big" / "clvr_controller.json").read_text())["image_size"] == 96
    assert json.loads((tmp_path / "big" / "processor_config.json").read_text())["image_processor"]["size"][
        "longest_edge"] == 96 * 96
    big, _ = load_qwen3_vl(str(tmp_path / "big"), torch_dtype="float32", device="cpu")
    assert (big.config.vision_config.depth, big.config.text_config.num_hidden_layers) == (3, 3)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in model.parameters())
    # a different input from the script's own check: a canvas of shapes and a longer text
    im = Image.new("RGB", (96, 64), "white")
    im.paste((200, 30, 30), (10, 10, 40, 40))
    im.paste((30, 30, 200), (50, 20, 90, 60))
    msgs = [{"role": "user", "content": [{"type": "image", "image": im},
                                         {"type": "text", "text": "two squares, red left of blue"}]}]
    enc = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                        add_generation_prompt=True)
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, big(**enc).logits, atol=1e-5)
    big.train()
    big(**enc).logits.sum().backward()
    new_block = big.model.visual.blocks[2]
    assert new_block.mlp.linear_fc2.weight.grad.abs().sum() > 0  # the zero output projection learns
    assert big.model.language_model.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    shrink = _run(str(SCRIPTS / "grow_vlm.py"), str(tmp_path / "big"), str(tmp_path / "x"), "--vision-depth", "1")
    assert shrink.returncode == 2 and "can only grow" in shrink.stderr and not (tmp_path / "x").exists()
    odd = _run(str(SCRIPTS / "grow_vlm.py"), str(init), str(tmp_path / "y"), "--image-size", "100")
    assert odd.returncode == 2 and "multiple of 32" in odd.stderr and not (tmp_path / "y").exists()
    same = _run(str(SCRIPTS / "grow_vlm.py"), str(init), str(init))
    assert same.returncode == 2 and "init folder" in same.stderr and (init / "model.safetensors").is_file()


def test_swap_calls_pairs_each_verify_text_with_another_canvas_and_the_exact_verdict(tmp_path):
    from PIL import Image

    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.training.sft_vlm import load_calls
    from clvr_agent.types import Verdict

    _synth(tmp_path / "syn", n=16, seed=4, record_calls=True)
    res = _run(str(SCRIPTS / "swap_calls.py"), str(tmp_path / "sw"), str(tmp_path / "syn"), "--n", "40", "--seed", "1")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "sw" / "swap.json").read_text())
    assert report["written"] == 40 and report["counts"]["constraints:met"] > 0 < report["counts"]["constraints:unmet"]
    originals = {(c.prompt, c.image.path) for c in load_calls(tmp_path / "syn") if c.task == "verify"}
    swapped = load_calls(tmp_path / "sw")  # sft-vlm reads it in place
    oracle = ShapeWorldController()
    for c in swapped:
        assert c.task == "verify" and c.meta["swapped_from"] != c.prompt
        assert (c.prompt, c.image.path) not in originals  # a real pairing would teach nothing new
        with Image.open(c.image.path) as im:
            assert Verdict.model_validate_json(c.reply) == oracle.verify(c.prompt, c.plan, im.convert("RGB"), c.history)
    bad = _run(str(SCRIPTS / "swap_calls.py"), str(tmp_path / "b"), str(tmp_path / "syn"), "--same-tag", "2")
    assert bad.returncode == 2 and "--same-tag" in bad.stderr

    # the same prompt's other canvases, whole verdicts held at half satisfied
    res = _run(str(SCRIPTS / "swap_calls.py"), str(tmp_path / "sp"), str(tmp_path / "syn"), "--n", "20", "--seed", "1",
               "--same-prompt", "1", "--satisfied", "0.5")
    assert res.returncode == 0, res.stderr
    counts = json.loads((tmp_path / "sp" / "swap.json").read_text())["counts"]
    assert counts["verify:met"] == counts["verify:unmet"] == 10 and counts["same_prompt"] == 20
    for c in load_calls(tmp_path / "sp"):
        assert c.meta["swapped_from"] == c.prompt and c.image.sha256 != c.meta["replaced_image"]
        with Image.open(c.image.path) as im:
            assert Verdict.model_validate_json(c.reply) == oracle.verify(c.prompt, c.plan, im.convert("RGB"), c.history)
    for flags in (["--satisfied", "1"], ["--same-prompt", "-0.1"]):
        bad = _run(str(SCRIPTS / "swap_calls.py"), str(tmp_path / "b"), str(tmp_path / "syn"), *flags)
        assert bad.returncode == 2 and flags[0] in bad.stderr and not (tmp_path / "b").exists()


def test_cell_targets_mark_each_object_in_the_cell_of_its_centre():
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(SCRIPTS))
    from pretrain_vision import COLOURS, N_LABELS, SHAPES, cell_targets

    from clvr_agent.tools.shapeworld.world import BACKGROUND, PALETTE

    im = Image.new("RGB", (256, 256), tuple(BACKGROUND))
    draw = ImageDraw.Draw(im)
    draw.rectangle([150, 20, 200, 70], fill=PALETTE["red"])  # centre (175, 45): row 0, column 2
    draw.ellipse([20, 160, 80, 220], fill=PALETTE["blue"])  # centre (50, 190): row 2, column 0
    t = cell_targets(im, 4)
    assert t.shape == (16, N_LABELS)
    pairs, k = len(COLOURS) * len(SHAPES), len(COLOURS) * len(SHAPES) + len(COLOURS)
    red, blue = COLOURS.index("red"), COLOURS.index("blue")
    square, circle = SHAPES.index("square"), SHAPES.index("circle")
    assert {(int(c), int(j)) for c, j in zip(*t.nonzero())} == {
        (2, red * len(SHAPES) + square), (2, pairs + red), (2, k + square),
        (8, blue * len(SHAPES) + circle), (8, pairs + blue), (8, k + circle)}


def test_pretrain_vision_trains_the_tower_only_and_writes_a_controller_folder(tmp_path):
    import torch

    from clvr_agent.tools.qwen3_vl import load_qwen3_vl

    init = tmp_path / "init"
    _saved_tiny_vlm(init, seed=0)
    _synth(tmp_path / "syn", n=16, seed=2)
    out = tmp_path / "pv"
    res = _run(str(SCRIPTS / "pretrain_vision.py"), str(init), str(out), str(tmp_path / "syn"), "--steps", "4",
               "--images", "6", "--heldout", "3", "--batch-size", "3", "--eval-every", "2")
    assert res.returncode == 0, res.stderr
    before, _ = load_qwen3_vl(str(init), torch_dtype="float32", device="cpu")
    after, _ = load_qwen3_vl(str(out), torch_dtype="float32", device="cpu")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    vision = [n for n in b if n.startswith("model.visual.")]
    assert vision and any(not torch.equal(b[n], a[n]) for n in vision)
    assert all(torch.equal(b[n], a[n]) for n in b if n not in vision)  # the language model is untouched
    record = json.loads((out / "clvr_mini_vlm.json").read_text())["pretrain_vision"]
    assert [r["step"] for r in record["curve"]] == [0, 2, 4] and record["grid"] == 2
    assert json.loads((out / "clvr_controller.json").read_text()) == {"image_size": 64}
    res = _run(str(SCRIPTS / "pretrain_vision.py"), str(init), str(tmp_path / "probe"), str(tmp_path / "syn"),
               "--steps", "2", "--images", "6", "--heldout", "3", "--batch-size", "3", "--probe")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["probe"]["curve"][-1]["step"] == 2
    assert not (tmp_path / "probe" / "config.json").exists()  # a probe writes readings, not a model

    for args, says in (([str(tmp_path / "nope"), str(tmp_path / "o1"), str(tmp_path / "syn")], "not a clvr-mini-vlm"),
                       ([str(init), str(init), str(tmp_path / "syn")], "must differ"),
                       ([str(init), str(tmp_path / "o2"), str(tmp_path / "empty")], "not a folder"),
                       ([str(init), str(tmp_path / "o3"), str(tmp_path / "syn"), "--heldout", "500"], "canvases")):
        bad = _run(str(SCRIPTS / "pretrain_vision.py"), *args)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_drill_calls_ask_one_object_the_canvas_alone_answers(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(SCRIPTS))
    from drill_calls import score

    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.training.sft_vlm import load_calls
    from clvr_agent.types import Verdict

    _synth(tmp_path / "syn", n=12, seed=4, record_calls=True)
    res = _run(str(SCRIPTS / "drill_calls.py"), str(tmp_path / "dr"), str(tmp_path / "syn"), "--n", "30", "--seed", "1")
    assert res.returncode == 0, res.stderr
    counts = json.loads((tmp_path / "dr" / "drill.json").read_text())["counts"]
    assert counts["verify:met"] >= 10 and counts["verify:unmet"] >= 10  # half asked present, half absent
    drills = load_calls(tmp_path / "dr")  # sft-vlm reads it in place
    oracle = ShapeWorldController()
    for c in drills:
        assert c.task == "verify" and not c.history and len(c.plan.constraints) == 1
        with Image.open(c.image.path) as im:
            assert Verdict.model_validate_json(c.reply) == oracle.verify(c.prompt, c.plan, im.convert("RGB"), [])
    assert score(drills, oracle)["balanced"] == 1.0

    class Yes:  # answers "satisfied" without looking
        def verify(self, prompt, plan, canvas, history):
            return Verdict(satisfied=True, score=1.0, constraints=[])

    assert score(drills, Yes())["balanced"] == 0.5
    for args, says in (([str(tmp_path / "x")], "SRC"), ([str(tmp_path / "x"), "--score", "clvr-mini-vlm"], "calls-drill")):
        bad = _run(str(SCRIPTS / "drill_calls.py"), *args)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr


def test_pretrain_vision_killed_mid_run_leaves_no_output_folder(tmp_path):
    """A user kills the stage while it trains: OUT is either absent or whole (it is built beside and moved in)."""

    init = tmp_path / "init"
    _saved_tiny_vlm(init, seed=0)
    _synth(tmp_path / "syn", n=16, seed=2)
    out = tmp_path / "pv"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "pretrain_vision.py"), str(init), str(out),
                             str(tmp_path / "syn"), "--steps", "100000", "--images", "6", "--heldout", "3",
                             "--batch-size", "3", "--eval-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert '"step": 0' in proc.stdout.readline()  # training has started
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not out.exists()


def test_pretrain_vision_word_head_reads_canvases_through_the_prompt_words(tmp_path):
    """--word-head: a cell's colour and shape logits are its token's dot product with the embeddings of the
    words prompts use (" red", " circle"); the deepstack mergers learn the same reading; the LM is untouched."""
    import torch

    sys.path.insert(0, str(SCRIPTS))
    from pretrain_vision import COLOURS, SHAPES, WordHead, word_ids

    from clvr_agent.tools.qwen3_vl import load_qwen3_vl

    shipped = SCRIPTS.parents[1] / "tools" / "models" / "clvr-mini-vlm"
    model, processor = load_qwen3_vl(str(shipped), torch_dtype="float32", device="cpu")
    ids = word_ids(processor.tokenizer)
    assert processor.tokenizer.decode(ids[COLOURS.index("red")]).strip() == "red"
    embed = model.get_input_embeddings().weight.detach()
    head = WordHead(embed.shape[1], embed[ids])
    token = embed[ids[COLOURS.index("red")]] + embed[ids[len(COLOURS) + SHAPES.index("circle")]]
    logits = head(token[None])[0, len(COLOURS) * len(SHAPES):]
    assert int(logits[:len(COLOURS)].argmax()) == COLOURS.index("red")
    assert int(logits[len(COLOURS):].argmax()) == SHAPES.index("circle")

    _synth(tmp_path / "syn", n=16, seed=2)
    out = tmp_path / "pw"
    res = _run(str(SCRIPTS / "pretrain_vision.py"), str(shipped), str(out), str(tmp_path / "syn"), "--steps", "2",
               "--images", "6", "--heldout", "3", "--batch-size", "3", "--eval-every", "2", "--word-head")
    assert res.returncode == 0, res.stderr
    after, _ = load_qwen3_vl(str(out), torch_dtype="float32", device="cpu")
    b, a = dict(model.named_parameters()), dict(after.named_parameters())
    deep = [n for n in b if ".deepstack_merger_list." in n]
    assert deep and any(not torch.equal(b[n], a[n]) for n in deep)  # the deepstack tokens learn the words too
    assert all(torch.equal(b[n], a[n]) for n in b if not n.startswith("model.visual."))
    record = json.loads((out / "clvr_mini_vlm.json").read_text())["pretrain_vision"]
    assert record["word_head"] is True and record["curve"][-1]["token_norm"] > 0

    init = tmp_path / "chars"  # the tiny test vocabulary spells words letter by letter: no word to read through
    _saved_tiny_vlm(init, seed=0)
    bad = _run(str(SCRIPTS / "pretrain_vision.py"), str(init), str(tmp_path / "o4"), str(tmp_path / "syn"),
               "--steps", "2", "--images", "6", "--heldout", "3", "--batch-size", "3", "--word-head")
    assert bad.returncode == 2 and "one token per colour and shape word" in bad.stderr, bad.stderr
    assert not (tmp_path / "o4").exists()


def test_drill_learn_trains_the_verdict_token_and_scores_held_out_drills(tmp_path):
    """drill_learn.py: trains a copy of the model on the decisive token only; the folder is untouched; the curve
    holds threshold-free held-out scores; each --label's answers are what the canvas shows."""
    sys.path.insert(0, str(SCRIPTS))
    from drill_learn import answers, auc, auc_interval, balanced

    from clvr_agent.tools.shapeworld.detect import detect
    from clvr_agent.training.sft_vlm import load_calls

    _synth(tmp_path / "syn", n=12, seed=4, record_calls=True)
    for name, seed in (("train", "1"), ("held", "2")):
        res = _run(str(SCRIPTS / "drill_calls.py"), str(tmp_path / name), str(tmp_path / "syn"), "--n", "12",
                   "--seed", seed)
        assert res.returncode == 0, res.stderr
    drills = load_calls(tmp_path / "held")
    assert answers(drills, "verdict") == [json.loads(c.reply)["satisfied"] for c in drills]
    for c, red, colour in zip(drills, answers(drills, "red"), answers(drills, "colour")):
        seen = {d.color for d in detect(c.image.open())}
        assert red == ("red" in seen) and colour == (c.prompt.split()[-2] in seen)
    assert auc([2.0, 1.0, -1.0], [True, True, False]) == 1.0 and balanced([2.0, -1.0, -3.0], [True, True, False]) == 0.75
    from PIL import Image, ImageDraw

    from clvr_agent.tools.shapeworld.world import BACKGROUND, PALETTE
    from drill_learn import caption

    im = Image.new("RGB", (256, 256), tuple(BACKGROUND))
    draw = ImageDraw.Draw(im)
    draw.ellipse([20, 160, 80, 220], fill=PALETTE["blue"])
    draw.rectangle([150, 20, 200, 70], fill=PALETTE["red"])
    assert caption(im) == "found red square, blue circle"  # palette order, whatever the drawing order
    assert caption(Image.new("RGB", (256, 256), tuple(BACKGROUND))) == "found nothing"

    init = tmp_path / "vlm"
    _saved_tiny_vlm(init, seed=0)
    weights = (init / "model.safetensors").read_bytes()
    out = tmp_path / "curve.json"
    res = _run(str(SCRIPTS / "drill_learn.py"), str(init), str(tmp_path / "train"), str(tmp_path / "held"), str(out),
               "--steps", "2", "--eval-every", "1", "--batch-size", "4", "--caption", "0.5", "--label", "colour")
    assert res.returncode == 0, res.stderr
    record = json.loads(out.read_text())
    assert record["caption"] == 0.5 and record["label"] == "colour"
    assert [p["step"] for p in record["curve"]] == [0, 1, 2] and record["held"] == 12
    assert all(p["auc_95"][0] <= p["auc"] <= p["auc_95"][1] and 0.0 <= p["balanced"] <= 1.0 for p in record["curve"])
    lo, hi = auc_interval(0.5, 122, 78)  # chance, 200 drills: the interval a curve must leave to have learned
    assert 0.41 < lo < 0.43 and 0.57 < hi < 0.59
    assert (init / "model.safetensors").read_bytes() == weights  # a copy in memory trains; nothing is saved
    for args, says in (([str(init), str(tmp_path / "syn"), str(tmp_path / "held"), str(tmp_path / "c.json")], "calls-drill"),
                       ([str(init), str(tmp_path / "train"), str(tmp_path / "held"), str(tmp_path / "no" / "c.json")], "does not exist"),
                       ([str(tmp_path / "nope"), str(tmp_path / "train"), str(tmp_path / "held"), str(tmp_path / "c.json")], "Qwen3-VL"),
                       ([str(init), str(tmp_path / "train"), str(tmp_path / "held"), str(tmp_path / "c.json"), "--caption", "1"], "share")):
        bad = _run(str(SCRIPTS / "drill_learn.py"), *args)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
    assert not (tmp_path / "c.json").exists()


def test_drill_learn_killed_mid_run_leaves_no_curve_file(tmp_path):
    """A user kills drill_learn while it trains: OUT.json is absent, never half written."""
    _synth(tmp_path / "syn", n=12, seed=4, record_calls=True)
    for name, seed in (("train", "1"), ("held", "2")):
        assert _run(str(SCRIPTS / "drill_calls.py"), str(tmp_path / name), str(tmp_path / "syn"), "--n", "8",
                    "--seed", seed).returncode == 0
    init = tmp_path / "vlm"
    _saved_tiny_vlm(init, seed=0)
    out = tmp_path / "curve.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "drill_learn.py"), str(init), str(tmp_path / "train"),
                             str(tmp_path / "held"), str(out), "--steps", "100000", "--eval-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert '"step": 0' in proc.stdout.readline()  # training has started
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert list(tmp_path.glob("curve.json*")) == []
