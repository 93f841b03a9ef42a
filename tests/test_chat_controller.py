"""ChatModelController against langchain-core's fake chat models, scripted with valid and invalid replies."""

from __future__ import annotations

import base64
import io
import json
import sys
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from PIL import Image
from pydantic import Field

from clvr_agent.store import ArtifactStore
from clvr_agent.tools import prompts
from clvr_agent.protocols import Controller
from clvr_agent.errors import ControllerOutputError
from clvr_agent.tools.chat_controller import ChatModelController, extract_json
from clvr_agent.types import Constraint, ExecutorRequest, Plan, Step, Verdict


class RecordingFake(GenericFakeChatModel):
    """GenericFakeChatModel that also keeps every message list it was sent."""

    calls: list = Field(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs: Any):
        self.calls.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


class ToolCallingFake(RecordingFake):
    """A fake that 'supports' tool calling, so with_structured_output is available."""

    def bind_tools(self, tools, **kwargs):
        return self


def fake(*replies) -> RecordingFake:
    return RecordingFake(messages=iter(replies))


PLAN = {
    "constraints": [
        {"id": "c1", "text": "a red cube", "kind": "color"},
        {"id": "c2", "text": "the cube is on a blue sphere", "kind": "relation"},
    ],
    "first_instruction": "a red cube resting on top of a blue sphere",
    "reasoning": "two objects, one relation",
}
VERDICT = {
    "satisfied": False,
    "score": 0.5,
    "constraints": [{"id": "c1", "satisfied": True}, {"id": "c2", "satisfied": False, "detail": "side by side"}],
    "summary": "the cube is beside the sphere",
}


def plan_record() -> Plan:
    return Plan(constraints=[Constraint(**c) for c in PLAN["constraints"]], first_instruction=PLAN["first_instruction"])


def canvas(color="red", size=(96, 96)) -> Image.Image:
    return Image.new("RGB", size, color)


def images_sent(message) -> list[Image.Image]:
    """Decode every image content block of a message (they must be base64 PNG data URLs)."""
    out = []
    for block in message.content:
        if block["type"] == "image_url":
            url = block["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def test_satisfies_controller_protocol():
    assert isinstance(ChatModelController(fake()), Controller)


def test_plan_parses_fenced_json_and_shows_the_schema():
    model = fake("Here is the plan:\n```json\n" + json.dumps(PLAN) + "\n```")
    plan = ChatModelController(model).plan("a red cube on a blue sphere")
    assert [c.id for c in plan.constraints] == ["c1", "c2"]
    assert plan.first_instruction == PLAN["first_instruction"] and plan.fallback is False
    system, user = model.calls[0]
    assert isinstance(system, SystemMessage) and '"first_instruction"' in system.content  # JSON schema in text mode
    assert "a red cube on a blue sphere" in user.content


def test_invalid_output_is_retried_with_the_error_fed_back():
    bad_schema = json.dumps({"constraints": PLAN["constraints"]})  # first_instruction missing
    model = fake("I cannot do JSON", bad_schema, json.dumps(PLAN))
    plan = ChatModelController(model, max_retries=2).plan("p")
    assert plan.constraints[0].text == "a red cube"
    assert len(model.calls) == 3
    first_retry, second_retry = model.calls[1], model.calls[2]
    assert isinstance(first_retry[-2], AIMessage) and first_retry[-2].content == "I cannot do JSON"
    assert isinstance(first_retry[-1], HumanMessage) and "no JSON object" in first_retry[-1].content
    assert second_retry[-2].content == bad_schema and "first_instruction" in second_retry[-1].content


def test_bounded_retries_then_controller_output_error():
    model = fake("garbage", "{}", "{not json", json.dumps(PLAN))
    with pytest.raises(ControllerOutputError, match="3 attempts"):
        ChatModelController(model, max_retries=2).plan("p")
    assert len(model.calls) == 3  # the valid fourth reply was never asked for
    with pytest.raises(ControllerOutputError):
        ChatModelController(fake("nope"), max_retries=0).plan("p")


def test_verify_requires_one_result_per_constraint_and_consistency():
    missing = dict(VERDICT, constraints=VERDICT["constraints"][:1])
    inconsistent = dict(VERDICT, satisfied=True)
    model = fake(json.dumps(missing), json.dumps(inconsistent), json.dumps(VERDICT))
    verdict = ChatModelController(model).verify("p", plan_record(), canvas(), [])
    assert isinstance(verdict, Verdict) and [c.id for c in verdict.unmet()] == ["c2"]
    assert "['c1', 'c2']" in model.calls[1][-1].content
    assert "every constraint" in model.calls[2][-1].content
    # The verifier sees the constraints and exactly one image: the canvas.
    user = model.calls[0][1]
    assert "c2 (relation): the cube is on a blue sphere" in user.content[0]["text"]
    assert len(images_sent(user)) == 1


def test_correct_parses_and_checks_inpaint_region():
    no_region = {"instruction": "put the cube on top", "mode": "inpaint"}
    outside = dict(no_region, region={"x0": 0, "y0": 0, "x1": 500, "y1": 50})
    good = dict(no_region, region={"x0": 10, "y0": 0, "x1": 90, "y1": 50})
    model = fake(json.dumps(no_region), json.dumps(outside), json.dumps(good))
    verdict = Verdict.model_validate(VERDICT)
    correction = ChatModelController(model).correct("p", plan_record(), verdict, canvas(), [])
    assert correction.mode == "inpaint" and correction.region.x1 == 90
    assert "needs a region" in model.calls[1][-1].content and "x1 <= 96" in model.calls[2][-1].content
    text = model.calls[0][1].content[0]["text"]
    assert "Unmet constraints:\n- c2" in text and "96x96" in text and "beside the sphere" in text


def test_images_are_sent_as_downscaled_png_blocks():
    model = fake(json.dumps({"executed": True, "detail": "a cube appeared"}))
    controller = ChatModelController(model, image_size=64)
    check = controller.check_step("add a cube", canvas("blue", (256, 128)), canvas("red", (512, 256)))
    assert check.executed
    before, after = images_sent(model.calls[0][1])
    assert before.size == (64, 32) and after.size == (64, 32)  # longer side = image_size, aspect kept
    assert before.getpixel((5, 5)) == (0, 0, 255) and after.getpixel((5, 5)) == (255, 0, 0)
    # Small images are not upscaled; a first step has no "before" image.
    model = fake(json.dumps({"executed": False}))
    ChatModelController(model, image_size=64).check_step("draw", None, canvas(size=(40, 20)))
    (only,) = images_sent(model.calls[0][1])
    assert only.size == (40, 20)
    assert prompts.CHECK_NO_BEFORE in [b.get("text") for b in model.calls[0][1].content]


def make_history(tmp_path, n: int, current: Image.Image) -> list[Step]:
    store = ArtifactStore(tmp_path)
    steps = []
    for i in range(n):
        image = current if i == n - 1 else canvas((10 * i, 0, 0))
        request = ExecutorRequest(mode="edit", instruction=f"instruction {i}", accumulated_prompt="p", seed=0)
        steps.append(
            Step(index=i, iteration=i, instruction=f"instruction number {i} " + "x" * 60, request=request, canvas=store.put(image))
        )
    return steps


def test_history_keeps_the_most_recent_steps_within_the_budget(tmp_path):
    current = canvas("white", (64, 64))
    history = make_history(tmp_path, 20, current)
    # A step line is 112 chars (28 tokens) and a 64x64 image 4 tokens: 5 lines + 2 images = 148 <= 150.
    model = fake(json.dumps(VERDICT))
    controller = ChatModelController(model, image_size=64, history_token_budget=150, history_images=2)
    controller.verify("p", plan_record(), current, history)
    user = model.calls[0][1]
    text = user.content[0]["text"]
    kept = [i for i in range(20) if f"instruction number {i} " in text]
    assert kept == [15, 16, 17, 18, 19]
    assert "(15 earlier steps omitted)" in text
    labels = [b["text"] for b in user.content if b["type"] == "text"][1:]
    # Canvases of the two most recent earlier steps (step 19's canvas is the current one, sent once).
    assert labels == ["Canvas after step 17:", "Canvas after step 18:", prompts.CURRENT_CANVAS_LABEL]
    sent = images_sent(user)
    assert [im.getpixel((0, 0)) for im in sent] == [(170, 0, 0), (180, 0, 0), (255, 255, 255)]


def test_history_with_no_room_sends_no_steps(tmp_path):
    current = canvas("white", (64, 64))
    model = fake(json.dumps(VERDICT))
    ChatModelController(model, history_token_budget=0).verify("p", plan_record(), current, make_history(tmp_path, 3, current))
    text = model.calls[0][1].content[0]["text"]
    assert "(3 earlier steps omitted)" in text and "instruction number" not in text
    assert len(images_sent(model.calls[0][1])) == 1


def tool_reply(name: str, args: dict) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": "call-1"}])


def test_structured_output_path_with_retry():
    bad = dict(VERDICT, score=3.0)  # out of range
    model = ToolCallingFake(messages=iter([tool_reply("Verdict", bad), tool_reply("Verdict", VERDICT)]))
    controller = ChatModelController(model)
    verdict = controller.verify("p", plan_record(), canvas(), [])
    assert verdict.score == 0.5
    assert "JSON schema" not in model.calls[0][0].content  # the schema travels as a tool, not as text
    assert json.loads(model.calls[1][-2].content)["score"] == 3.0
    assert "score" in model.calls[1][-1].content
    # A tool-calling model that answers in text is still parsed.
    model = ToolCallingFake(messages=iter(["```json\n" + json.dumps(PLAN) + "\n```"]))
    assert ChatModelController(model).plan("p").constraints[1].id == "c2"


def test_structured_output_modes():
    with pytest.raises(NotImplementedError):
        ChatModelController(fake(json.dumps(PLAN)), use_structured_output=True).plan("p")
    model = ToolCallingFake(messages=iter([json.dumps(PLAN)]))
    ChatModelController(model, use_structured_output=False).plan("p")
    assert "JSON schema" in model.calls[0][0].content
    with pytest.raises(ValueError, match="use_structured_output"):
        ChatModelController(fake(), use_structured_output="yes")


def test_extract_json_tolerates_prose_fences_and_think_blocks():
    assert extract_json('<think>{"a": 0}</think> sure: {"a": 1} trailing') == {"a": 1}
    assert extract_json('```\n{"a": [1, {"b": 2}]}\n```') == {"a": [1, {"b": 2}]}
    assert extract_json('[1] then {bad then {"ok": true}') == {"ok": True}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("[1, 2]")


def test_from_spec(monkeypatch):
    model = fake()
    controller = ChatModelController.from_spec(model=model, image_size=128)
    assert controller.model is model and controller.image_size == 128 and controller.name == "chat-model"
    with pytest.raises(ValueError, match="base_url"):
        ChatModelController.from_spec()
    with pytest.raises(ValueError, match="model_name"):
        ChatModelController.from_spec(base_url="http://localhost:8000/v1")
    monkeypatch.setitem(sys.modules, "langchain_openai", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install langchain-openai"):
        ChatModelController.from_spec(base_url="http://localhost:8000/v1", model_name="Qwen/Qwen3-VL-8B-Instruct")


def test_registry_builds_chat_model_controller():
    from clvr_agent.tools.registry import get_controller

    controller = get_controller("chat-model", model=fake(json.dumps(PLAN)), max_retries=1)
    assert isinstance(controller, ChatModelController) and controller.max_retries == 1
    assert controller.plan("p").first_instruction == PLAN["first_instruction"]
