"""VLM SFT on the tiny real Qwen3-VL: the assistant-only mask, image placement, learning (LoRA and full), resume."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image

from clvr_agent.store import ArtifactStore
from clvr_agent.tools import prompts
from clvr_agent.tools.tiny_vlm import build_tiny_qwen3_vl
from clvr_agent.training.sft_vlm import (
    IGNORE_INDEX,
    LORA_TARGET_MODULES,
    AssistantOnlyCollator,
    SFTVLMConfig,
    SFTVLMTrainer,
    TrajectoryDialogueDataset,
    load_trajectories,
    render_dialogues,
    shared_prefix_length,
    system_key,
    trajectory_exchanges,
)
from clvr_agent.types import (
    Constraint,
    ConstraintResult,
    ExecutorRequest,
    PassiveCheck,
    Plan,
    Step,
    Trajectory,
    Verdict,
)

VISION = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"  # a 64x64 canvas: 4 merged tokens


def make_trajectory(store: ArtifactStore, prompt: str, colors: tuple, seed: int) -> Trajectory:
    """Two iterations: a generate that misses one constraint, then an edit that satisfies it."""
    a = store.put(Image.new("RGB", (64, 64), colors[0]))
    b = store.put(Image.new("RGB", (64, 64), colors[1]))
    plan = Plan(constraints=[Constraint(id="c1", text="a red circle", kind="color"),
                             Constraint(id="c2", text="a square", kind="presence")],
                first_instruction=prompt, reasoning="two objects")
    v1 = Verdict(satisfied=False, score=0.5, summary="no square",
                 constraints=[ConstraintResult(id="c1", satisfied=True), ConstraintResult(id="c2", satisfied=False)])
    v2 = Verdict(satisfied=True, score=1.0, summary="all met",
                 constraints=[ConstraintResult(id="c1", satisfied=True), ConstraintResult(id="c2", satisfied=True)])
    s0 = Step(index=0, iteration=1, instruction=prompt, canvas=a, passive=PassiveCheck(executed=True, detail="drawn"),
              verdict=v1, request=ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt, seed=seed))
    s1 = Step(index=1, iteration=2, instruction="add a square", reasoning="c2 unmet", canvas=b,
              passive=PassiveCheck(executed=True, detail="a square appeared"), verdict=v2,
              request=ExecutorRequest(mode="edit", instruction="add a square", references=[a],
                                      accumulated_prompt=prompt + "\nadd a square", seed=seed + 1))
    return Trajectory(prompt=prompt, seed=seed, plan=plan, steps=[s0, s1], status="satisfied",
                      final_canvas=b, iterations=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A synth-style folder: data.jsonl with relative image paths + images/."""
    root = tmp_path_factory.mktemp("sftdata")
    store = ArtifactStore(root / "images")
    lines = []
    for k, (prompt, colors) in enumerate([("a photo of a red circle and a square", ((200, 30, 30), (30, 30, 200))),
                                          ("a photo of a green triangle", ((30, 200, 30), (240, 240, 240)))]):
        traj = make_trajectory(store, prompt, colors, seed=k)
        rec = json.loads(traj.model_dump_json())
        for ref in _refs(rec):
            ref["path"] = "images/" + ref["path"].rsplit("/", 1)[1]
        lines.append(json.dumps(rec))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _refs(obj):
    if isinstance(obj, dict):
        if "sha256" in obj and "path" in obj:
            yield obj
        for v in obj.values():
            yield from _refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _refs(v)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen3_vl(seed=0)


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    out, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("dialogue", ["trajectory", "calls"])
def test_mask_is_exactly_the_assistant_spans(data_dir, tiny, dialogue):
    _, processor = tiny
    records = load_trajectories(data_dir)
    traj, root = records[0]
    exchanges = trajectory_exchanges(traj, root)
    assert [e.task for e in exchanges] == ["plan", "check", "verify", "correct", "check", "verify"]
    convs = render_dialogues(exchanges, dialogue)
    assert len(convs) == (1 if dialogue == "trajectory" else len(exchanges))
    collator = AssistantOnlyCollator(processor)
    batch = collator(convs)
    tok = processor.tokenizer
    got = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        got += [tok.decode(s) for s in spans(ids, labels)]
    assert got == [e.reply + "<|im_end|>" for e in exchanges]
    # the replies are the records the controller parses
    assert json.loads(exchanges[3].reply) == {"instruction": "add a square", "mode": "edit",
                                              "reasoning": "c2 unmet", "region": None,
                                              "region_prompt": None}
    # padding is masked, and no image token is ever a target
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert not ((batch["labels"] == image_id).any())
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()


def test_images_appear_where_they_occur(data_dir, tiny):
    _, processor = tiny
    traj, root = load_trajectories(data_dir)[0]
    conv = render_dialogues(trajectory_exchanges(traj, root), "trajectory")[0]
    batch = AssistantOnlyCollator(processor)([conv])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    check_edit = (prompts.CHECK_USER.format(instruction="add a square") + prompts.BEFORE_LABEL + VISION
                  + prompts.AFTER_LABEL + VISION + "<|im_end|>")
    assert check_edit in text
    assert prompts.CHECK_NO_BEFORE + prompts.AFTER_LABEL + VISION + "<|im_end|>" in text
    assert text.count(prompts.CURRENT_CANVAS_LABEL + VISION + "<|im_end|>") == 3  # verify, correct, verify
    n_images = text.count("<|vision_start|>")
    assert n_images == 1 + 2 + 3 == batch["image_grid_thw"].shape[0]  # check0, check1 (before, after), 3 canvases
    assert int(batch["image_grid_thw"].prod(-1).sum()) == batch["pixel_values"].shape[0]
    # calls mode adds the controller's history canvas to the second verify (the first canvas)
    calls = render_dialogues(trajectory_exchanges(traj, root), "calls")
    last_verify = processor.tokenizer.decode(AssistantOnlyCollator(processor)([calls[-1]])["input_ids"][0])
    assert prompts.HISTORY_IMAGE_LABEL.format(index=0) + VISION + prompts.CURRENT_CANVAS_LABEL + VISION in last_verify
    assert "Reply with only one JSON object" in last_verify


COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A fixed tiny dialogue set in the trajectory layout (canvas in a user turn, JSON verdict replies),
    short enough for a byte-level tokenizer: the reply names the canvas colour, so the image matters."""
    root = tmp_path_factory.mktemp("small")
    convs = []
    for name, rgb in COLORS.items():
        path = root / f"{name}.png"
        Image.new("RGB", (64, 64), rgb).save(path)
        convs.append([
            {"role": "system", "content": "controller"},
            {"role": "user", "content": [{"type": "text", "text": "verify: a red square"},
                                         {"type": "image", "path": str(path)}]},
            {"role": "assistant", "content": json.dumps({"satisfied": name == "red", "color": name})},
            {"role": "user", "content": [{"type": "text", "text": "correct"}]},
            {"role": "assistant", "content": json.dumps({"instruction": "recolor to red", "mode": "edit"})},
        ])
    return TrajectoryDialogueDataset(convs)


def _train(dataset, out, lora_rank, max_steps, lr, resume=False, checkpoint_every=0):
    model, processor = build_tiny_qwen3_vl(seed=0)
    cfg = SFTVLMConfig(output_dir=str(out), max_steps=max_steps, batch_size=2, learning_rate=lr,
                       lr_scheduler="constant", lora_rank=lora_rank, checkpoint_every=checkpoint_every,
                       log_every=0, resume=resume, seed=0)
    return SFTVLMTrainer(model, processor, cfg, dataset)


@pytest.mark.parametrize("lora_rank,lr", [(0, 2e-2), (8, 1e-2)])
def test_loss_falls(small_dataset, tmp_path, lora_rank, lr):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    trainer = _train(small_dataset, tmp_path / "out", lora_rank, max_steps=12, lr=lr)
    before = trainer.evaluate(range(len(small_dataset)))
    initial = {n: p.detach().clone() for n, p in build_tiny_qwen3_vl(seed=0)[0].named_parameters()}
    history = trainer.train()
    assert all(math.isfinite(h["loss"]) for h in history)
    # the exported folder is a plain Qwen3-VL (LoRA merged) and keeps the lower loss
    exported = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    probe = _train(small_dataset, tmp_path / "probe", 0, 1, 1e-3)
    probe.run = exported
    after = probe.evaluate(range(len(small_dataset)))
    changed = {n for n, p in exported.named_parameters() if not torch.equal(p, initial[n])}
    if lora_rank:
        # A tiny 2-layer model with near-uniform logits moves slowly through its projections alone.
        assert after < before - 0.15, (before, after, [round(h["loss"], 3) for h in history])
        assert changed and all(re.fullmatch(LORA_TARGET_MODULES, n.rsplit(".", 1)[0]) for n in changed)
    else:
        assert after < 0.7 * before, (before, after, [round(h["loss"], 3) for h in history])
        assert any("embed_tokens" in n for n in changed) and not any(".visual." in n for n in changed)
    assert AutoProcessor.from_pretrained(tmp_path / "out").tokenizer.convert_tokens_to_ids("<|im_end|>") is not None


def test_resume_continues_exactly(small_dataset, tmp_path):
    full = _train(small_dataset, tmp_path / "a", 8, max_steps=4, lr=1e-2).train()
    _train(small_dataset, tmp_path / "b", 8, max_steps=2, lr=1e-2, checkpoint_every=2).train()
    resumed = _train(small_dataset, tmp_path / "b", 8, max_steps=4, lr=1e-2, resume=True).train()
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[2:]], rel=1e-5)
    assert full[3]["loss"] != pytest.approx(full[1]["loss"], rel=1e-3)  # the parameters did move


def test_config_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        SFTVLMConfig(batch_size=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="dialogue"):
        SFTVLMConfig(dialogue="chat")
    with pytest.raises(ValueError, match="train_vision"):
        SFTVLMConfig(lora_rank=4, train_vision=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        pass_cfg = SFTVLMConfig(resume=True, output_dir="/nonexistent-sft", max_steps=1)
        model, processor = build_tiny_qwen3_vl()
        ds = TrajectoryDialogueDataset([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]])
        SFTVLMTrainer(model, processor, pass_cfg, ds).train()


def test_cli_sft_vlm_on_synth_output(tmp_path):
    """synth -> `clvr train sft-vlm` end to end: real trajectories, the saved tiny model, LoRA, a loadable result."""
    import typer
    from typer.testing import CliRunner

    from clvr_agent.cli.data import register_train
    from clvr_agent.tools.qwen3_vl import load_qwen3_vl
    from clvr_agent.tools.registry import get_controller, get_executor
    from clvr_agent.training.synth import SynthConfig, synthesize

    data = tmp_path / "data"
    report = synthesize(SynthConfig(out=str(data), n=4, progress=False), get_executor("shapeworld"),
                        get_controller("shapeworld"))
    assert report.kept > 0
    model, processor = build_tiny_qwen3_vl(seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    app = typer.Typer()
    register_train(app)
    app.command("noop")(lambda: None)
    args = ["sft-vlm", "--data", str(data), "--model", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
            "--lora-rank", "4", "--dialogue", "calls", "--max-steps", "2", "--batch-size", "1",
            "--learning-rate", "1e-2", "--checkpoint-every", "1", "--log-every", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    # --config like every `clvr train` command; flags override it; a resumed run at max_steps does nothing new
    (tmp_path / "cfg.json").write_text(json.dumps({"max_steps": 3, "gradient_accumulation_steps": 1}))
    res = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "cfg.json"), "--max-steps", "3", "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == 3
    trained, _ = load_qwen3_vl(str(tmp_path / "out"), torch_dtype="float32", device="cpu")
    base = dict(model.named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in trained.named_parameters())
    bad = CliRunner().invoke(app, [*args, "--full"])  # the old spelling of --lora-rank 0 contradicts --lora-rank 4
    assert bad.exit_code == 2 and "--full" in bad.output
    bad = CliRunner().invoke(app, ["sft-vlm", "--data", str(tmp_path / "nowhere"), "--model", "x/y", "--out", "o"])
    assert bad.exit_code == 2 and "no trajectory data" in bad.output


def test_shared_prefix_length_stops_before_labels_and_images():
    ids = torch.arange(30).repeat(3, 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 20:] = ids[:, 20:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert shared_prefix_length(batch) == 19  # the logit at 19 predicts the first label
    ids[2, 15] = 99
    assert shared_prefix_length(batch) == 15
    assert shared_prefix_length(batch, vision_ids=[9]) == 9
    assert shared_prefix_length(batch, vision_ids=[5]) == 0  # shorter than min_tokens
    assert shared_prefix_length({k: v[:1] for k, v in batch.items()}) == 0  # one row: nothing to share
    ids[1, 3] = 77
    assert shared_prefix_length(batch) == 0


def test_shared_prefix_gives_the_plain_loss_and_gradients(data_dir, tmp_path):
    """The controller's own conversations (system text with the schema, canvases, history) grouped by system
    text: the loss and every gradient with the prefix run once equal the plain forward's."""
    dataset = TrajectoryDialogueDataset.from_trajectories(load_trajectories(data_dir), dialogue="calls", image_size=64)
    model, processor = build_tiny_qwen3_vl(seed=0)
    cfg = SFTVLMConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=12, train_vision=True, log_every=0)
    trainer = SFTVLMTrainer(model, processor, cfg, dataset)
    convs = [dataset[i] for i in range(len(dataset))]
    assert len(convs) == 12
    batches = trainer.micro_batches(range(len(dataset)))
    assert len(batches) == 4  # plan, check, verify, correct: one system text each
    shared = 0
    for batch in batches:
        systems = {trainer.processor.tokenizer.decode(row).split("<|im_end|>")[0] for row in batch["input_ids"]}
        assert len(systems) == 1 and {system_key(c) for c in convs} >= {systems.pop().split("system\n", 1)[1]}
        prefix = shared_prefix_length(batch, trainer._vision_ids)
        if batch["input_ids"].shape[0] > 1:
            assert prefix > 200  # the system text at least
            assert (batch["labels"][:, : prefix + 1] == IGNORE_INDEX).all()
            shared += 1
        results = []
        for share in (False, True):
            trainer.run.zero_grad()
            loss, n = trainer.loss(batch, share_prefix=share)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in trainer.params if p.grad is not None]))
        (plain, g_plain), (fast, g_fast) = results
        assert fast == pytest.approx(plain, rel=1e-5)
        assert len(g_plain) == len(g_fast)
        for a, b in zip(g_plain, g_fast):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert shared >= 3


def test_training_with_a_shared_prefix_matches_the_plain_run(data_dir, tmp_path):
    dataset = TrajectoryDialogueDataset.from_trajectories(load_trajectories(data_dir), dialogue="calls", image_size=64)

    def run(share, out):
        model, processor = build_tiny_qwen3_vl(seed=0)
        cfg = SFTVLMConfig(output_dir=str(out), max_steps=3, batch_size=6, learning_rate=1e-2, lora_rank=0,
                           train_vision=True, lr_scheduler="constant", log_every=0, seed=0, share_prefix=share)
        return [h["loss"] for h in SFTVLMTrainer(model, processor, cfg, dataset).train()]

    plain, fast = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    assert fast == pytest.approx(plain, rel=1e-4)
    assert plain[2] != pytest.approx(plain[0], rel=1e-3)


def test_encodings_are_kept_between_epochs_and_equal_fresh_ones(data_dir, tmp_path):
    dataset = TrajectoryDialogueDataset.from_trajectories(load_trajectories(data_dir), dialogue="calls", image_size=64)
    model, processor = build_tiny_qwen3_vl(seed=0)
    cfg = SFTVLMConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=12, log_every=0)
    trainer = SFTVLMTrainer(model, processor, cfg, dataset)
    calls = []
    encode = trainer.collator.encode
    trainer.collator.encode = lambda conv: calls.append(1) or encode(conv)
    first = trainer.micro_batches(range(12))
    assert len(calls) == 12
    again = trainer.micro_batches(range(12))
    assert len(calls) == 12  # the second epoch renders and tokenizes nothing
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = AssistantOnlyCollator(processor, image_size=64)
    plain = [fresh([dataset[i]]) for i in range(12)]
    rows = sorted(tuple(r[m == 1].tolist()) for b in again for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert rows == sorted(tuple(p["input_ids"][0].tolist()) for p in plain)
    pixels = torch.cat([b["pixel_values"] for b in again if "pixel_values" in b])
    assert pixels.shape == torch.cat([p["pixel_values"] for p in plain if "pixel_values" in p]).shape
    # a budget of 0 keeps nothing
    off = SFTVLMTrainer(*build_tiny_qwen3_vl(seed=0), SFTVLMConfig(output_dir=str(tmp_path / "o2"), max_steps=1,
                                                                   batch_size=12, log_every=0, encode_cache_mb=0), dataset)
    off.micro_batches(range(12))
    assert not off._encoded
    with pytest.raises(ValueError, match="encode_cache_mb"):
        SFTVLMConfig(encode_cache_mb=-1)
