"""The flux2-klein executor end to end on tiny real-class FLUX.2 [klein] pipelines (CPU, offline)."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from clvr_agent.protocols import Executor
from clvr_agent.errors import Cancelled
from clvr_agent.tools.flux2_klein import CheckpointError, Flux2KleinExecutor, clvr_mini_path, fit_reference
from clvr_agent.types import ExecutorRequest, Region

PROMPT = "a red cube on a blue sphere"


def request(mode="generate", seed=0, **kw) -> ExecutorRequest:
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    return ExecutorRequest(mode=mode, instruction=PROMPT, accumulated_prompt=PROMPT, seed=seed, **kw)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def executor(tiny_klein):
    return Flux2KleinExecutor.from_pipeline(tiny_klein)


@pytest.fixture(scope="module")
def canvas(executor):
    return executor.generate(request(), []).image


@contextmanager
def image_tokens_seen(pipe):
    """Yields a list of the image-stream lengths (noise + reference tokens) of each transformer pass."""
    seen: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        hook.remove()


def test_text_to_image(executor):
    out = executor.generate(request(), [])
    assert isinstance(executor, Executor)
    assert out.image.size == (64, 64) and out.image.mode == "RGB"
    assert out.nfe == 4 and out.seconds > 0
    assert out.info["pipeline"] == "Flux2KleinPipeline" and out.info["references"] == 0


def test_non_square_size_and_bad_size(executor):
    assert executor.generate(request(height=32, width=96), []).image.size == (96, 32)
    with pytest.raises(ValueError, match="multiple of"):
        executor.generate(request(height=62), [])


@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_edit_passes_every_reference_to_the_transformer(executor, canvas, n_refs):
    refs = [canvas.rotate(90 * i) for i in range(n_refs)]
    with image_tokens_seen(executor.pipe) as seen:
        executor.generate(request("edit"), refs)
    tokens_per_image = (64 // executor.size_multiple) ** 2
    assert seen == [tokens_per_image * (1 + n_refs)] * 4  # noise tokens + each reference's tokens, 4 steps

    edited = executor.generate(request("edit"), refs)
    assert edited.nfe == 4 and edited.info["references"] == n_refs
    assert not np.array_equal(pixels(edited.image), pixels(executor.generate(request(), []).image))


def test_different_references_give_different_edits(executor, canvas):
    a = executor.generate(request("edit"), [canvas]).image
    b = executor.generate(request("edit"), [Image.new("RGB", (64, 64), (255, 255, 255))]).image
    assert not np.array_equal(pixels(a), pixels(b))  # random weights: references matter, if only a little


def test_edit_defaults_to_the_latest_canvas_size(executor, canvas):
    out = executor.generate(request("edit", height=None, width=None), [canvas, canvas.resize((96, 64))])
    assert out.image.size == (96, 64)


def test_generate_ignores_references_and_edit_needs_one(executor, canvas):
    plain = executor.generate(request(), []).image
    assert np.array_equal(pixels(executor.generate(request(), [canvas]).image), pixels(plain))
    with pytest.raises(ValueError, match="at least one reference"):
        executor.generate(request("edit"), [])


def test_references_are_fitted_to_klein_limits(executor):
    small = Image.new("RGB", (40, 50), (200, 30, 30))
    assert fit_reference(small).size == (64, 80)
    assert max(fit_reference(Image.new("RGB", (2048, 1024))).size) == 1448
    assert executor.generate(request("edit"), [small]).nfe == 4
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_reference(Image.new("RGB", (900, 100)))


def test_nfe_distilled_is_four_and_base_cfg_is_two_per_step(executor, tiny_klein_base):
    assert executor.generate(request(guidance=4.0), []).nfe == 4  # distilled ignores guidance
    base = Flux2KleinExecutor.from_pipeline(tiny_klein_base)
    assert base.defaults() == (28, 4.0)
    out = base.generate(request(steps=3), [])
    assert out.nfe == 6 and out.info["cfg"] is True
    assert base.generate(request(steps=3, guidance=1.0), []).nfe == 3  # guidance 1: no CFG pass


def test_seeds_reproduce(executor):
    a, b = (executor.generate(request(seed=7), []).image for _ in range(2))
    c = executor.generate(request(seed=8), []).image
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_progress_events_and_cancellation(executor):
    events = []
    executor.generate(request(), [], progress=lambda i, n: events.append((i, n)))
    assert events == [(1, 4), (2, 4), (3, 4), (4, 4)]

    stopped = []

    def stop_after_two(i, n):
        stopped.append(i)
        return i >= 2

    with image_tokens_seen(executor.pipe) as seen, pytest.raises(Cancelled, match="after 2 of 4"):
        executor.generate(request(), [], progress=stop_after_two)
    assert stopped == [1, 2] and len(seen) == 2  # the remaining two steps never ran
    assert executor.generate(request(), []).nfe == 4  # and the pipeline is usable again


def test_inpaint_repaints_the_region(executor, canvas):
    region = Region(x0=0, y0=0, x1=24, y1=24)
    a = executor.generate(request("inpaint", region=region), [canvas])
    b = executor.generate(request("inpaint", seed=5, region=region), [canvas])
    assert a.info["pipeline"] == "Flux2KleinInpaintPipeline" and a.nfe == 4 and a.image.size == (64, 64)
    diff = np.abs(pixels(a.image) - pixels(b.image)).mean(-1)
    # Seeds change the masked box; outside it the latents are the canvas's, so only VAE mixing differs.
    assert diff[:24, :24].mean() > 4 * diff[40:, 40:].mean()
    with pytest.raises(ValueError, match="region"):
        executor.generate(request("inpaint"), [canvas])
    with pytest.raises(ValueError, match="outside"):
        executor.generate(request("inpaint", region=Region(x0=0, y0=0, x1=99, y1=10)), [canvas])


@pytest.fixture(scope="module")
def native64(tiny_klein):
    """The tiny pipeline with a 64² native draw (as clvr-mini's clvr_canvas.json sets): its default,
    128 latents × VAE factor 2 = 256², is slow on CPU."""
    return Flux2KleinExecutor(tiny_klein, draw_size=64)


def test_region_draw_size_keeps_the_native_area_and_the_region_aspect(executor, native64):
    from clvr_agent.tools.flux2_klein import region_draw_size

    assert region_draw_size(400, 200, 1024, 16) == (720, 1456)  # klein: 2:1 at ~1024² (1456·720 = 1.0 × 1024²)
    assert region_draw_size(150, 150, 1024, 16) == (1024, 1024)  # a small square region still draws at 1024²
    assert region_draw_size(100, 300, 64, 16) == (112, 32)  # clvr-mini's 64² area, 1:3
    assert region_draw_size(2, 300, 64, 16) == (784, 16)  # never below one multiple
    assert executor.native_side == 128 * executor.pipe.vae_scale_factor  # the pipeline's default size
    assert native64.native_side == 64


def test_region_prompt_draws_the_region_alone_and_pastes_it(native64, canvas):
    executor = native64
    region = Region(x0=8, y0=16, x1=40, y1=48)
    tiled = request("inpaint", region=region, region_prompt="a photo of a blue square", height=None, width=None)
    with image_tokens_seen(executor.pipe) as seen:
        out = executor.generate(tiled, [canvas])
    assert out.info["pipeline"] == "Flux2KleinPipeline" and out.info["region_prompt"] == "a photo of a blue square"
    assert out.nfe == 4 and (out.info["height"], out.info["width"]) == (64, 64)  # the tile, at the native size
    with image_tokens_seen(executor.pipe) as plain:
        executor.generate(request(height=64, width=64), [])
    assert seen[0] == plain[0]  # no reference tokens: the region is drawn afresh from its own prompt
    after, before = pixels(out.image), pixels(canvas)
    assert out.image.size == canvas.size
    inside = np.zeros(before.shape[:2], bool)
    inside[16:48, 8:40] = True
    assert np.array_equal(after[~inside], before[~inside])  # the rest of the canvas is untouched
    assert np.abs(after[inside] - before[inside]).mean() > 1
    assert pixels(canvas).sum() == before.sum()  # the reference itself was not modified
    with pytest.raises(ValueError, match="outside"):
        executor.generate(tiled.model_copy(update={"region": Region(x0=40, y0=0, x1=90, y1=30)}), [canvas])


def test_non_square_region_is_drawn_at_its_aspect_then_resized_into_it(native64, canvas):
    """A 48×24 region is drawn 92×44 (the 64² area at 2:1 in multiples of 4), not as a squashed square."""
    from clvr_agent.tools import flux2_klein

    region = Region(x0=8, y0=20, x1=56, y1=44)
    tiled = request("inpaint", region=region, region_prompt="a photo of a red circle", height=64, width=64)
    pasted = []
    original = flux2_klein.paste_region

    def record(canvas_, tile, region_):
        pasted.append(tile.size)
        return original(canvas_, tile, region_)

    flux2_klein.paste_region = record  # spy on the real function; it still pastes
    try:
        out = native64.generate(tiled, [canvas])
    finally:
        flux2_klein.paste_region = original
    assert (out.info["height"], out.info["width"]) == (44, 92)  # request height/width size the canvas, not the tile
    assert pasted == [(92, 44)] and abs(92 / 44 - 48 / 24) < 0.1 and abs(92 * 44 - 64 * 64) < 64 * 4
    before, after = pixels(canvas), pixels(out.image)
    inside = np.zeros(before.shape[:2], bool)
    inside[20:44, 8:56] = True
    assert out.image.size == canvas.size and np.array_equal(after[~inside], before[~inside])


def test_save_load_round_trip_through_the_registry(executor, tiny_klein_dir):
    from clvr_agent.tools.registry import LOAD_COUNTS, clear_cache, get_executor

    clear_cache()
    try:
        options = dict(model=str(tiny_klein_dir), torch_dtype="float32", device="cpu")
        loaded = get_executor("flux2-klein", **options)
        assert get_executor("flux2-klein", **options) is loaded and LOAD_COUNTS["executor:flux2-klein"] == 1
        assert loaded.is_distilled and loaded.max_sequence_length == executor.max_sequence_length
        out = loaded.generate(request(seed=3), [])
        assert out.nfe == 4
        assert np.array_equal(pixels(out.image), pixels(executor.generate(request(seed=3), []).image))
    finally:
        clear_cache()


def test_kv_checkpoint_loads_the_kv_pipeline(tmp_path, canvas):
    from diffusers import Flux2KleinKVPipeline

    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    # A private pipeline: the KV pipeline swaps the transformer's attention processors.
    Flux2KleinKVPipeline(**build_tiny_flux2_klein(seed=1).components).save_pretrained(tmp_path)
    kv = Flux2KleinExecutor.from_pretrained(str(tmp_path), torch_dtype="float32", device="cpu")
    assert kv.is_kv and kv.is_distilled and type(kv.pipe).__name__ == "Flux2KleinKVPipeline"
    out = kv.generate(request("edit"), [canvas, canvas])
    assert out.nfe == 4 and out.info["pipeline"] == "Flux2KleinKVPipeline"
    assert kv.generate(request("inpaint", region=Region(x0=8, y0=8, x1=32, y1=32)), [canvas]).nfe == 4


def test_missing_or_broken_checkpoints_fail_clearly(tmp_path, tiny_klein_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
        Flux2KleinExecutor.from_pretrained(str(missing), torch_dtype="float32", device="cpu")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        Flux2KleinExecutor.from_pretrained(str(empty), torch_dtype="float32", device="cpu")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_klein_dir, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"transformer/ has no \*\.safetensors"):
        Flux2KleinExecutor.from_pretrained(str(broken), torch_dtype="float32", device="cpu")

    other = tmp_path / "other"
    shutil.copytree(tiny_klein_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="expected one of Flux2KleinPipeline"):
        Flux2KleinExecutor.from_pretrained(str(other), torch_dtype="float32", device="cpu")


def test_uncached_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="clvr-test/no-such-klein"):
        Flux2KleinExecutor.from_pretrained("clvr-test/no-such-klein", torch_dtype="float32", device="cpu")


def test_bad_options_fail_clearly(tiny_klein_dir):
    with pytest.raises(ValueError, match="unknown torch dtype"):
        Flux2KleinExecutor.from_pretrained(str(tiny_klein_dir), torch_dtype="float33", device="cpu")
    with pytest.raises(ValueError, match="offload"):
        Flux2KleinExecutor.from_pretrained(str(tiny_klein_dir), device="cpu", offload=True)


def test_out_layer_mismatch_is_refused(tiny_klein):
    from diffusers import Flux2KleinPipeline

    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    wide = build_tiny_flux2_klein(text_hidden=32)  # joint_attention_dim 96 vs the 16-wide encoder's 48
    pipe = Flux2KleinPipeline(**{**tiny_klein.components, "transformer": wide.transformer})
    with pytest.raises(CheckpointError, match="joint_attention_dim"):
        Flux2KleinExecutor.from_pipeline(pipe)


def test_clvr_mini_path_is_the_shipped_folder_or_a_clear_error(monkeypatch, tmp_path):
    import clvr_agent.tools.loading as loading

    folder = clvr_mini_path()  # shipped with the package: a complete diffusers folder
    assert folder.name == "clvr-mini" and (folder / "model_index.json").is_file()
    monkeypatch.setattr(loading, "SHIPPED_MODELS", tmp_path)  # an install without the weights
    with pytest.raises(CheckpointError, match=r"clvr-mini is not installed at .*--model DIR"):
        clvr_mini_path()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bfloat16_and_offload(tiny_klein_dir):
    for offload in (False, True):
        ex = Flux2KleinExecutor.from_pretrained(str(tiny_klein_dir), torch_dtype="bfloat16", device="cuda", offload=offload)
        out = ex.generate(request(), [])
        edit = ex.generate(request("edit"), [out.image])
        assert out.nfe == 4 and edit.nfe == 4 and edit.image.size == (64, 64)
        assert ex.pipe.transformer.dtype == torch.bfloat16


def test_long_accumulated_prompt_keeps_prompt_and_latest_instruction(tiny_klein):
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

    ex = Flux2KleinExecutor.from_pipeline(tiny_klein)
    lines = ["a photo of a red circle"] + [f"instruction number {i} " + "x" * 20 for i in range(20)]
    fitted = ex.fit_prompt("\n".join(lines))
    assert ex.prompt_tokens(fitted) <= ex.max_sequence_length
    kept = fitted.split("\n")
    assert kept[0] == lines[0] and kept[-1] == lines[-1] and 1 < len(kept) < len(lines)
    assert ex.fit_prompt("a short prompt") == "a short prompt"


def test_fit_prompt_keeps_the_newest_instruction_when_prompt_and_newest_exceed_the_limit(tiny_klein):
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

    ex = Flux2KleinExecutor.from_pipeline(tiny_klein)
    limit = ex.max_sequence_length  # 256 byte tokens for the tiny tokenizer
    head = "a photo of a red circle and " + "a very long description " * 7  # ~200 tokens alone
    newest = "now add a blue square to the left of the circle " * 2  # ~100 tokens
    lines = [head, "an older instruction", newest]
    assert ex.prompt_tokens(head) < limit < ex.prompt_tokens(f"{head}\n{newest}")
    fitted = ex.fit_prompt("\n".join(lines))
    assert fitted.split("\n")[-1] == newest  # the instruction this step executes is never dropped
    assert ex.prompt_tokens(fitted) <= limit and fitted.startswith("a photo of a red circle")  # the prompt, cut
    assert len(fitted.split("\n")) == 2  # no room for the older instruction
    alone = "z" * (limit + 50)
    assert ex.fit_prompt(f"{head}\n{alone}") == alone  # nothing else fits: the newest alone (the pipeline truncates it)


def test_native_draw_size_and_canvas_size(tiny_klein, tmp_path):
    """A checkpoint trained at a small native size draws there and hands the loop a larger canvas."""
    import json

    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.types import ExecutorRequest, Region

    tiny_klein.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "clvr_canvas.json").write_text(json.dumps({"draw_size": 64, "canvas_size": 128}))
    ex = Flux2KleinExecutor.from_pretrained(str(tmp_path / "m"), torch_dtype="float32", device="cpu")
    assert (ex.draw_size, ex.canvas_size) == (64, 128)
    seen = []
    hook = ex.pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    try:
        req = ExecutorRequest(mode="generate", instruction="a", accumulated_prompt="a red circle", seed=0)
        first = ex.generate(req, []).image
        edit = ex.generate(req.model_copy(update={"mode": "edit"}), [first]).image
        region = Region(x0=0, y0=0, x1=64, y1=64)
        inpaint = ex.generate(req.model_copy(update={"mode": "inpaint", "region": region}), [first]).image
    finally:
        hook.remove()
    assert first.size == edit.size == inpaint.size == (128, 128)
    # A region draw takes the folder's draw size as the native area: a 2:1 region of the 128² canvas
    # is drawn 92×44 (≈ 64², multiples of 4) and resized into the region.
    assert ex.native_side == 64
    tile = ex.generate(req.model_copy(update={"mode": "inpaint", "region": Region(x0=0, y0=0, x1=64, y1=32),
                                              "region_prompt": "a photo of a red circle"}), [first])
    assert (tile.info["height"], tile.info["width"]) == (44, 92) and tile.image.size == (128, 128)
    tokens_64 = seen[0]  # 64x64 draw; an edit adds one 64x64 reference of the same length
    assert seen[4] == 2 * tokens_64
    assert ex.defaults() == (4, 1.0)  # the tiny fixture is distilled: "guidance" never applies to it
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    base = Flux2KleinExecutor.from_pretrained(str(tmp_path / "m"), torch_dtype="float32", device="cpu")
    assert base.defaults() == (28, 4.0)  # a base checkpoint, no "guidance" key: klein's default
    (tmp_path / "m" / "clvr_canvas.json").write_text(json.dumps({"draw_size": 64, "guidance": 2.0}))
    tuned = Flux2KleinExecutor.from_pretrained(str(tmp_path / "m"), torch_dtype="float32", device="cpu")
    assert tuned.defaults() == (28, 2.0)
    fast = {"steps": 2}
    assert tuned.generate(req.model_copy(update=fast), []).info["guidance"] == 2.0
    assert tuned.generate(req.model_copy(update={**fast, "guidance": 3.0}), []).info["guidance"] == 3.0  # a request wins
    (tmp_path / "m" / "clvr_canvas.json").write_text(json.dumps({"draw_size": 64, "guidance": 0.5}))
    import pytest

    with pytest.raises(ValueError, match="base_guidance must be"):
        Flux2KleinExecutor.from_pretrained(str(tmp_path / "m"), torch_dtype="float32", device="cpu")
    (tmp_path / "m" / "clvr_canvas.json").write_text(json.dumps({"draw": 64}))

    from clvr_agent.tools.flux2_klein import CheckpointError

    with pytest.raises(CheckpointError, match="unknown keys"):
        Flux2KleinExecutor.from_pretrained(str(tmp_path / "m"), torch_dtype="float32", device="cpu")
