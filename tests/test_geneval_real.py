"""GenEval on real images: tiny random Mask2Former and CLIP built from their configs (no download).

Pins the plumbing, not the weights: masks → boxes; masks → crops on grey → CLIP colour; detections →
the shared rules in ``clvr_agent.eval.rules``; the official folder layout, resume and sharding; and the
whole ``clvr eval geneval`` command on a tiny FLUX.2 [klein].
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from clvr_agent import create_clvr
from clvr_agent.eval.sampling import Sample, loop, prompt_seed, single_step
from clvr_agent.eval.geneval import (
    generate_geneval, sample_path, score_folder, shard_indices,
)
from clvr_agent.eval.rules import COLORS, Detection, evaluate_image, load_object_names, load_official_metadata
from clvr_agent.eval.rules import select_detections
from clvr_agent.tools.clip_color import TEMPLATES, ClipColorClassifier, crop_on_grey
from clvr_agent.tools import mask2former_detector
from clvr_agent.tools.mask2former_detector import Mask2FormerDetector, geneval_names, mask_to_box, rescaled_size

# detectron2/transformers spelling of the COCO things (what the hub checkpoints' id2label holds).
DETECTRON2_NAMES = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n)
                    for n in load_object_names()]


def build_tiny_mask2former(favour: str | None = None, seed: int = 0):
    """A random Mask2FormerForUniversalSegmentation over the 80 COCO things and its image processor.

    ``favour``: bias the class head so every query predicts that class with probability ≈ 1.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from transformers import SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, hidden_dim=32, mask_feature_size=32,
        feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=24, id2label=dict(enumerate(DETECTRON2_NAMES)),
        label2id={n: i for i, n in enumerate(DETECTRON2_NAMES)},
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if favour is not None:
        with torch.no_grad():
            head = model.class_predictor
            head.weight.zero_()
            head.bias.fill_(-20.0)
            head.bias[DETECTRON2_NAMES.index(favour)] = 20.0
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32)
    return model, processor


def build_tiny_clip(seed: int = 0):
    """A random CLIPModel with a byte-level CLIPTokenizer (no merges) and a 32² image processor."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread; more only add sync overhead on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(one_thread, tmp_path_factory):
    """Folders written by save_pretrained, loaded back through from_pretrained(DIR) as users do."""
    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    root = tmp_path_factory.mktemp("models")
    dirs = {name: root / name for name in ("m2f", "m2f_bench", "clip", "klein")}
    for name, favour in (("m2f", None), ("m2f_bench", "bench")):
        model, processor = build_tiny_mask2former(favour)
        model.save_pretrained(dirs[name])
        processor.save_pretrained(dirs[name])
    model, processor = build_tiny_clip()
    model.save_pretrained(dirs["clip"])
    processor.save_pretrained(dirs["clip"])
    build_tiny_flux2_klein().save_pretrained(dirs["klein"])
    return dirs


@pytest.fixture(scope="module")
def clip(model_dirs):
    return ClipColorClassifier.from_pretrained(str(model_dirs["clip"]), device="cpu")


@pytest.fixture
def small_test_scale(monkeypatch):
    """mmdet's resize/pad chain at (longest 128, shortest 64) instead of (1333, 800): the tiny detector
    costs ~2 s per image at 800² on this CPU. test_detector_uses_mmdet_test_size pins the real scale."""
    monkeypatch.setattr(mask2former_detector, "TEST_SCALE", (128, 64))


def _noise(w=80, h=96, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- masks → boxes → detections ---------------------------------------------------------------------


def test_mask_to_box_is_mmdet_mask2bbox():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    mask[7, 4] = True
    assert mask_to_box(mask) == (3.0, 2.0, 9.0, 8.0)  # (x_min, y_min, x_max + 1, y_max + 1)
    assert mask_to_box(np.zeros((4, 4), bool)) == (0.0, 0.0, 0.0, 0.0)


def test_labels_map_to_geneval_names():
    names = geneval_names(dict(enumerate(DETECTRON2_NAMES)))
    assert names == load_object_names() and "computer mouse" in names and "mouse" not in names
    with pytest.raises(ValueError, match="not GenEval.s 80 COCO classes"):
        geneval_names(dict(enumerate(DETECTRON2_NAMES[:79] + ["wall"])))


def test_rescaled_size_is_mmcv_keep_ratio_rescale():
    assert rescaled_size(1024, 1024) == (800, 800)  # (height, width): the shortest edge to 800
    assert rescaled_size(1024, 768) == (800, 1067)  # 1024 × 800/768 = 1066.7, rounded half up
    assert rescaled_size(90, 400) == (1333, 300)  # tall: the longest edge caps at 1333
    assert mask2former_detector.padded_size(800, 1067) == (800, 1088)


def test_detector_uses_mmdet_test_size_not_the_processor_size(model_dirs):
    """The folder's processor says shortest 64 / longest 128 (the published ones 384²); the detector
    resizes to mmdet's test scale (1333, 800) keep-ratio and pads to 32, normalizing as the processor does."""
    detector = Mask2FormerDetector.from_pretrained(str(model_dirs["m2f_bench"]), device="cpu")
    assert detector.test_scale == (1333, 800) and detector.processor.size["shortest_edge"] == 64
    colour = (200, 40, 120)
    image = Image.new("RGB", (256, 192), colour)  # 4:3 → 1067 × 800, padded to 1088 × 800
    seen = []
    hook = detector.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"]), with_kwargs=True)
    try:
        dets = detector(image)
    finally:
        hook.remove()
    (pixels,) = seen
    assert pixels.shape == (1, 3, 800, 1088)
    proc = detector.processor
    want = (torch.tensor(colour) / 255 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    torch.testing.assert_close(pixels[0, :, :800, :1067], want[:, None, None].expand(3, 800, 1067))
    assert pixels[0, :, :, 1067:].abs().max() == 0  # zero padding on the right, after normalization
    assert dets and all(d.mask.shape == (192, 256) for d in dets)  # masks come back at the image's size


@pytest.mark.usefixtures("small_test_scale")
def test_detector_from_folder_gives_mask_boxes_and_feeds_the_rules(model_dirs):
    detector = Mask2FormerDetector.from_pretrained(str(model_dirs["m2f_bench"]), device="cpu")
    image = _noise()  # 80 wide, 96 high: not square, so the crop/resize chain is exercised
    dets = detector(image)
    assert 1 <= len(dets) <= 16 and {d.cls for d in dets} == {"bench"}
    scores = [d.score for d in dets]
    assert scores == sorted(scores, reverse=True) and all(0.3 < s <= 1 for s in scores)
    for d in dets:
        assert d.mask.shape == (96, 80) and d.mask.dtype == bool and d.box == mask_to_box(d.mask)
    # The detector's own cut-off is the rules' (same > 0.3 and 16 cap): selection keeps all of them.
    assert select_detections("single_object", dets) == {"bench": dets}
    meta = load_official_metadata()[0]
    assert meta["prompt"] == "a photo of a bench" and evaluate_image(meta, dets) == (True, "")
    ok, reason = evaluate_image({"tag": "single_object", "include": [{"class": "cow", "count": 1}]}, dets)
    assert not ok and reason == "expected cow>=1, found 0"
    # An untrained head spreads probability over 80 classes: nothing clears 0.3.
    assert Mask2FormerDetector.from_pretrained(str(model_dirs["m2f"]), device="cpu")(image) == []


# --- masks → crops on grey → colour -----------------------------------------------------------------


def test_crop_on_grey_composites_mask_then_crops_box():
    image = _noise(10, 8)
    mask = np.zeros((8, 10), bool)
    mask[2:6, 3:7] = True
    mask[1, 8] = True
    pixels = np.asarray(image)
    grey = np.where(mask[..., None], pixels, np.array([153, 153, 153], np.uint8))
    crop = crop_on_grey(image, Detection("dog", mask_to_box(mask), 0.9, mask=mask))
    assert np.array_equal(np.asarray(crop), grey[1:6, 3:9])
    # A float box is rounded by PIL, as the official image.crop(box[:4]) is.
    crop = crop_on_grey(image, Detection("dog", (2.6, 0.4, 7.4, 5.6), 0.9, mask=mask))
    assert np.array_equal(np.asarray(crop), grey[0:6, 3:7])
    # No mask: the plain crop.
    assert np.array_equal(np.asarray(crop_on_grey(image, Detection("dog", (1, 1, 4, 3), 0.9))), pixels[1:3, 1:4])
    with pytest.raises(ValueError, match="does not match"):
        crop_on_grey(image, Detection("dog", (0, 0, 2, 2), 0.9, mask=mask.T))


def test_color_sees_only_the_masked_object(clip):
    mask = np.zeros((96, 80), bool)
    mask[20:60, 10:50] = True
    det = Detection("dog", mask_to_box(mask), 0.9, mask=mask)
    a = _noise(seed=1)
    b = np.asarray(_noise(seed=2)).copy()
    b[mask] = np.asarray(a)[mask]  # same object, different everything else
    pixels = clip.processor.image_processor(images=[crop_on_grey(a, det)], return_tensors="pt")["pixel_values"]
    feat = torch.nn.functional.normalize(clip.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    expected = COLORS[int((feat[0] @ clip.text_embeddings("dog")).argmax())]
    assert clip.colors(a, [det]) == clip.colors(Image.fromarray(b), [det]) == [expected]


def test_color_text_embeddings_are_the_official_templates_cached_per_class(clip):
    texts = [f"a photo of a {c} tv remote" for c in ("red", "blue")]
    texts += [f"a photo of a {c}-colored tv remote" for c in ("red", "blue")]
    texts += [f"a photo of a {c} object" for c in ("red", "blue")]
    assert [t.format(c=c, cls="tv remote") for t in TEMPLATES for c in ("red", "blue")] == texts
    calls = []
    hook = clip.model.text_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        emb = clip.text_embeddings("tv remote")
        assert clip.text_embeddings("tv remote") is emb and len(calls) == 1
    finally:
        hook.remove()
    assert emb.shape == (8, 10) and torch.allclose(emb.norm(dim=0), torch.ones(10))
    tok = clip.processor.tokenizer(texts[0::2], padding=True, return_tensors="pt")  # red, all three templates
    red = torch.nn.functional.normalize(clip.model.get_text_features(**tok).pooler_output, dim=-1).mean(0)
    assert torch.allclose(emb[:, 0], red / red.norm(), atol=1e-6)


def test_color_clause_uses_the_classifier(clip):
    image = _noise(seed=3)
    mask = np.zeros((96, 80), bool)
    mask[30:70, 20:60] = True
    det = Detection("car", mask_to_box(mask), 0.95, mask=mask)
    seen = clip.colors(image, [det])[0]
    other = next(c for c in COLORS if c != seen)
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": seen}]}
    assert evaluate_image(meta, [det], clip.for_image(image)) == (True, "")
    meta["include"][0]["color"] = other
    ok, reason = evaluate_image(meta, [det], clip.for_image(image))
    assert not ok and reason == f"expected {other} car>=1, found 0 {other}; and 1 {seen}"


# --- layout, resume, shards -------------------------------------------------------------------------


def _seed_sampler(calls):
    """Draws a 16² image whose pixel encodes the seed, so tests can read back which seed made it."""

    def make():
        calls.append("load")

        def sample(prompt, seed):
            return Sample(Image.new("RGB", (16, 16), (seed % 256, seed // 256 % 256, 7)), 1, "single")

        return sample

    return make


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_and_resume(tmp_path):
    calls = []
    counts = generate_geneval(tmp_path, _seed_sampler(calls), samples=2, limit=3)
    assert counts == {"prompts": 3, "generated": 6, "skipped": 0} and calls == ["load"]
    assert _files(tmp_path) == [f"{i:05d}/{f}" for i in range(3)
                                for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")]
    assert json.loads((tmp_path / "00002/metadata.jsonl").read_text()) == load_official_metadata()[2]
    seed = prompt_seed(0, 2, 1)
    assert seed != prompt_seed(0, 1, 2) and Image.open(sample_path(tmp_path, 2, 1)).getpixel((0, 0)) == (seed % 256, seed // 256 % 256, 7)
    # Resume: nothing new, no generator loaded; a lost sample is redrawn with its own seed.
    assert generate_geneval(tmp_path, _seed_sampler(calls), samples=2, limit=3)["generated"] == 0
    assert calls == ["load"]
    before = sample_path(tmp_path, 1, 0).read_bytes()
    sample_path(tmp_path, 1, 0).unlink()
    assert generate_geneval(tmp_path, _seed_sampler(calls), samples=2, limit=3)["generated"] == 1
    assert sample_path(tmp_path, 1, 0).read_bytes() == before
    # A folder of a different prompt set is refused rather than mixed.
    other = [dict(m, prompt=m["prompt"] + "!") for m in load_official_metadata()]
    with pytest.raises(ValueError, match="different prompt"):
        generate_geneval(tmp_path, _seed_sampler(calls), samples=2, limit=3, metadata=other)


def test_shards_merge_into_the_full_set(tmp_path):
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    generate_geneval(full, _seed_sampler([]), samples=2, limit=7)
    assert shard_indices(553, 7, (1, 3)) == [1, 4]
    parts = [generate_geneval(sharded, _seed_sampler([]), samples=2, limit=7, shard=(k, 3)) for k in range(3)]
    assert [p["prompts"] for p in parts] == [3, 2, 2]
    assert _files(sharded) == _files(full)
    assert all((sharded / f).read_bytes() == (full / f).read_bytes() for f in _files(full))
    for bad in ((3, 3), (-1, 2)):
        with pytest.raises(ValueError):
            shard_indices(553, 7, bad)


@pytest.mark.usefixtures("small_test_scale")
def test_score_writes_official_fields(tmp_path, model_dirs):
    generate_geneval(tmp_path, _seed_sampler([]), samples=2, limit=2)
    detector = Mask2FormerDetector.from_pretrained(str(model_dirs["m2f_bench"]), device="cpu")
    summary = score_folder(tmp_path, tmp_path, detector)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, False, False]  # bench passes, cow fails
    assert {"filename", "tag", "prompt", "correct", "reason"} <= set(rows[0])
    assert rows[0]["filename"] == str(tmp_path / "00000" / "samples" / "0000.png")
    assert rows[2]["reason"] == "expected cow>=1, found 0" and json.loads(rows[2]["metadata"])["prompt"] == "a photo of a cow"
    assert summary == {"overall": 0.5, "per_tag": {"single_object": 0.5}, "images": 4, "prompts": 2}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.usefixtures("small_test_scale")
def test_loop_mode_writes_the_loop_final_image(tmp_path, model_dirs):
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.tools.scripted import ScriptedController

    executor = Flux2KleinExecutor.from_pretrained(str(model_dirs["klein"]), torch_dtype="float32", device="cpu")
    make = lambda: loop(create_clvr(executor, controller=ScriptedController(scores=(1.0,)), max_iterations=1,
                                    height=64, width=64, artifact_dir=str(tmp_path / "work")))
    assert generate_geneval(tmp_path, make, samples=1, limit=1)["generated"] == 1
    assert Image.open(sample_path(tmp_path, 0, 0)).size == (64, 64)
    assert any((tmp_path / "work").rglob("*.png"))  # the loop's canvases
    single = single_step(executor, height=64, width=64)("a photo of a bench", 0)
    assert single.image.size == (64, 64) and single.status == "single"


# --- the command ------------------------------------------------------------------------------------


def _app():
    from clvr_agent.cli.geneval import register

    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `geneval` a subcommand
    return app


@pytest.mark.usefixtures("small_test_scale")
def test_cli_geneval_end_to_end(tmp_path, model_dirs):
    out = tmp_path / "geneval"
    args = ["geneval", "--backend", "flux2-klein", "--model", str(model_dirs["klein"]), "--detector", "mask2former",
            "--detector-model", str(model_dirs["m2f_bench"]), "--clip-model", str(model_dirs["clip"]),
            "--limit", "12", "--height", "64", "--width", "64", "--out", str(out)]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["generated"] == 48 and report["prompts"] == 12
    assert len(list(out.glob("[0-9][0-9][0-9][0-9][0-9]/samples/[0-9][0-9][0-9][0-9].png"))) == 48
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 48
    # The detector sees a bench everywhere: prompt 0 ("a bench") passes its 4 samples, the other 11 fail.
    assert report["summary"] == {"overall": round(4 / 48, 6), "per_tag": {"single_object": round(4 / 48, 6)}, "images": 48, "prompts": 12}
    assert json.loads((out / "summary.json").read_text()) == report["summary"]
    again = CliRunner().invoke(_app(), args)
    assert again.exit_code == 0 and json.loads(again.stdout)["generated"] == 0
    # `clvr eval score --detector mask2former` rescoring the folder agrees with the run.
    from clvr_agent.cli import app

    rescored = CliRunner().invoke(app, ["eval", "score", "--images", str(out), "--out", str(tmp_path / "rescored"),
                                        "--detector", "mask2former", "--detector-model", str(model_dirs["m2f_bench"]),
                                        "--clip-model", str(model_dirs["clip"])])
    assert rescored.exit_code == 0, rescored.output
    assert json.loads((tmp_path / "rescored" / "summary.json").read_text()) == report["summary"]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, model_dirs):
    base = ["geneval", "--backend", "flux2-klein", "--model", str(model_dirs["klein"]), "--out", str(tmp_path)]
    cases = [
        (base + ["--detector-model", str(model_dirs["m2f"])], "needs --detector-model and --clip-model"),
        (base + ["--detector", "none", "--shard", "2/2"], "need 0 <= K < N"),
        (base + ["--detector", "none", "--mode", "twice"], "choose single or loop"),
        (base + ["--detector-model", str(tmp_path / "nope"), "--clip-model", str(model_dirs["clip"])], "does not exist"),
        (["geneval", "--backend", "flux2-klein", "--detector", "none"], "needs --model"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(_app(), args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing generated on bad input
