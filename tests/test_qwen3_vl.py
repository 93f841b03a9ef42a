"""The qwen3-vl controller on a tiny random-weight Qwen3-VL built from the real transformers classes."""

from __future__ import annotations

import json

import pytest
import torch
from langchain_core.messages import HumanMessage, SystemMessage
from PIL import Image

from clvr_agent.errors import ControllerOutputError
from clvr_agent.tools.chat_controller import ChatModelController, image_block
from clvr_agent.tools.qwen3_vl import Qwen3VLChatModel, load_qwen3_vl_controller, to_qwen_conversation
from clvr_agent.tools.tiny_vlm import build_tiny_qwen3_vl
from clvr_agent.types import Constraint, Plan


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny-qwen3-vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def spy_generate(monkeypatch, model) -> list[dict]:
    """Record the inputs and output length of every real ``generate`` call."""
    calls = []
    real = model.generate

    def generate(**kwargs):
        out = real(**kwargs)
        calls.append(dict(kwargs, new_tokens=out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


PLAN = Plan(constraints=[Constraint(id="c1", text="a red cube")], first_instruction="a red cube")


def test_tiny_model_is_seeded(tiny):
    again, _ = build_tiny_qwen3_vl(seed=0)
    other, _ = build_tiny_qwen3_vl(seed=1)
    pairs = list(zip(tiny[0].parameters(), again.parameters()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(tiny[0].parameters(), other.parameters()))


def test_garbage_output_fails_after_bounded_retries(tiny, monkeypatch):
    model, processor = tiny
    calls = spy_generate(monkeypatch, model)
    chat = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=4)
    controller = ChatModelController(chat, image_size=64, max_retries=2)
    with pytest.raises(ControllerOutputError, match="no valid Verdict after 3 attempts"):
        controller.verify("a red cube", PLAN, Image.new("RGB", (128, 128), "red"), [])
    assert len(calls) == 3
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for call in calls:
        # The 128x128 canvas is sent at 64x64: a (1, 4, 4) patch grid, merged 2x2 into 4 image tokens.
        assert call["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert call["pixel_values"].shape == (16, 3 * 2 * 16 * 16)
        assert (call["input_ids"] == image_pad).sum().item() == 4
        assert call["do_sample"] is False and 1 <= call["new_tokens"] <= 4
    # Each retry carries the garbage reply and the error, so the prompt grows.
    lengths = [c["input_ids"].shape[1] for c in calls]
    assert lengths[0] < lengths[1] < lengths[2]


def test_adapter_converts_messages_and_is_greedy(tiny):
    model, processor = tiny
    image = Image.new("RGB", (64, 64), "blue")
    messages = [
        SystemMessage("be brief"),
        HumanMessage([{"type": "text", "text": "look:"}, image_block(image)]),
    ]
    conversation = to_qwen_conversation(messages)
    assert conversation[0] == {"role": "system", "content": "be brief"}
    assert conversation[1]["role"] == "user" and conversation[1]["content"][0] == {"type": "text", "text": "look:"}
    sent = conversation[1]["content"][1]["image"]
    assert sent.size == (64, 64) and sent.getpixel((0, 0)) == (0, 0, 255)
    chat = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=6)
    assert chat.invoke(messages).content == chat.invoke(messages).content
    with pytest.raises(ValueError, match="data-URL"):
        to_qwen_conversation([HumanMessage([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])])


def test_save_load_round_trip_from_a_local_folder(tiny, tiny_dir, monkeypatch):
    model, processor = tiny
    controller = load_qwen3_vl_controller(
        vlm=str(tiny_dir), torch_dtype="float32", device="cpu", max_new_tokens=5, max_retries=1
    )
    assert isinstance(controller, ChatModelController) and controller.name == "qwen3-vl"
    loaded = controller.model.model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    messages = [HumanMessage([{"type": "text", "text": "what is this?"}, image_block(Image.new("RGB", (64, 64), "red"))])]
    original = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=5)
    assert controller.model.invoke(messages).content == original.invoke(messages).content

    calls = spy_generate(monkeypatch, loaded)
    with pytest.raises(ControllerOutputError, match="2 attempts"):
        controller.plan("a red cube")
    assert len(calls) == 2 and "pixel_values" not in calls[0]  # planning sends no image


def test_registry_loads_qwen3_vl_once(tiny_dir):
    from clvr_agent.tools.registry import LOAD_COUNTS, clear_cache, get_controller

    clear_cache()
    options = dict(vlm=str(tiny_dir), torch_dtype="float32", device="cpu")
    first = get_controller("qwen3-vl", **options)
    assert get_controller("qwen3-vl", **options) is first
    assert LOAD_COUNTS["controller:qwen3-vl"] == 1
    clear_cache()


def test_missing_or_broken_folders_name_the_path(tiny_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_qwen3_vl_controller(vlm=str(missing), device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_qwen3_vl_controller(vlm=str(tmp_path), device="cpu")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"pickles are not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_qwen3_vl_controller(vlm=str(no_weights), device="cpu")

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(OSError, match=f"could not load Qwen3-VL from local folder {broken}"):
        load_qwen3_vl_controller(vlm=str(broken), device="cpu")

    with pytest.raises(ValueError, match="unknown torch dtype"):
        load_qwen3_vl_controller(vlm=str(tiny_dir), torch_dtype="bfloat17", device="cpu")
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_clvr_mini_vlm_is_shipped_and_loads_by_name_through_the_qwen3_vl_controller():
    """`--vlm clvr-mini-vlm`: the real Qwen3-VL classes from the package folder, with its controller settings."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    from clvr_agent.tools.loading import shipped_model
    from clvr_agent.tools.registry import get_controller

    folder = shipped_model("clvr-mini-vlm")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 30 * 2**20 and list(folder.glob("*.safetensors"))
    ctl = get_controller("qwen3-vl", vlm="clvr-mini-vlm", torch_dtype="float32", device="cpu")
    assert isinstance(ctl.model.model, Qwen3VLForConditionalGeneration)
    assert isinstance(ctl.model.processor, Qwen3VLProcessor)
    assert ctl.model.model.dtype == torch.float32
    assert (ctl.image_size, ctl.name) == (128, "qwen3-vl")
    # It was trained (a random init writes garbage): first-try plans equal to the teacher's checklist, the
    # prompt's words copied into it (README, "A learned controller": plan exact-match 0.97 on held-out canvases).
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController

    ctl.max_retries = 0
    for prompt in ("a photo of a red circle", "a photo of two stars", "a photo of a blue square left of a green star"):
        teacher, got = ShapeWorldController().plan(prompt), ctl.plan(prompt)
        assert [c.model_dump() for c in got.constraints] == [c.model_dump() for c in teacher.constraints], prompt
        assert got.first_instruction == teacher.first_instruction


def test_a_shipped_name_that_is_not_installed_says_where(monkeypatch, tmp_path):
    import clvr_agent.tools.loading as loading
    import clvr_agent.tools.qwen3_vl as q

    monkeypatch.setattr(loading, "SHIPPED_MODELS", tmp_path)
    with pytest.raises(FileNotFoundError, match="clvr-mini-vlm is not installed at"):
        q.load_qwen3_vl("clvr-mini-vlm")
