"""One renderer of controller conversations: what the chat controller sends is what VLM SFT trains,
masked against the real Qwen3-VL chat template; recorded teacher calls; Thinking replies."""

from __future__ import annotations

import json

import pytest
import torch
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from PIL import Image
from pydantic import Field

from clvr_agent.store import ArtifactStore
from clvr_agent.tools.chat_controller import ChatModelController, extract_json
from clvr_agent.tools.conversation import ControllerCall, RenderOptions, training_conversation
from clvr_agent.tools.qwen3_vl import is_thinking, load_qwen3_vl_controller, to_qwen_conversation
from clvr_agent.tools.tiny_vlm import QWEN3_VL_CHAT_TEMPLATE, build_tiny_qwen3_vl
from clvr_agent.training.sft_vlm import IGNORE_INDEX, AssistantOnlyCollator, TrajectoryDialogueDataset
from clvr_agent.training.synth import RecordingController, SynthConfig, synthesize
from clvr_agent.types import Constraint, ConstraintResult, ExecutorRequest, PassiveCheck, Plan, Step, Verdict


class RecordingFake(GenericFakeChatModel):
    calls: list = Field(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


PLAN = Plan(constraints=[Constraint(id="c0", text="a red circle", kind="color"),
                         Constraint(id="c1", text="a blue square", kind="color")],
            first_instruction="a photo of a red circle and a blue square")
VERDICT = Verdict(satisfied=False, score=0.5, summary="no blue square",
                  constraints=[ConstraintResult(id="c0", satisfied=True), ConstraintResult(id="c1", satisfied=False)])
CHECK = PassiveCheck(executed=True, detail="1 op(s) took effect")
CORRECTION_JSON = json.dumps({"instruction": "add a blue square", "mode": "edit", "reasoning": "c1 unmet"})


class Teacher:
    """A scripted controller with fixed answers (what RecordingController wraps)."""

    name = "teacher"

    def plan(self, prompt):
        return PLAN

    def check_step(self, instruction, before, after):
        return CHECK

    def verify(self, prompt, plan, canvas, history):
        return VERDICT

    def correct(self, prompt, plan, verdict, canvas, history):
        from clvr_agent.types import Correction

        return Correction.model_validate_json(CORRECTION_JSON)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen3_vl(seed=0)


def history(store, n):
    steps = []
    for i in range(n):
        request = ExecutorRequest(mode="generate" if i == 0 else "edit", instruction=f"step {i}",
                                  accumulated_prompt="p", seed=i)
        steps.append(Step(index=i, iteration=i + 1, instruction=f"instruction {i}", request=request,
                          canvas=store.put(Image.new("RGB", (96, 96), (40 * i, 90, 200))), passive=CHECK,
                          verdict=VERDICT))
    return steps


def processor_inputs(processor, conversation, generation_prompt):
    return processor.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("budget,n_history", [(2048, 4), (70, 4), (0, 2)])
def test_the_controller_sends_exactly_what_sft_trains(tmp_path, tiny, budget, n_history):
    """Every call: the Qwen3-VL adapter's conversation (inference) and the SFT conversation of the same call,
    recorded by the data engine, tokenize to the same ids and pixels; SFT adds only the assistant turn.
    A budget that fits one earlier canvas sends one (the old SFT copy sent the last two regardless)."""
    _, processor = tiny
    store = ArtifactStore(tmp_path / "run")
    steps = history(store, n_history)
    current = steps[-1].canvas.open()
    before = steps[-2].canvas.open()
    opts = RenderOptions(image_size=64, history_token_budget=budget, history_images=2)
    recorder = RecordingController(Teacher(), tmp_path / "data")
    recorder.plan("a photo of a red circle and a blue square")
    recorder.check_step("add a blue square", before, current)
    recorder.check_step("a photo of a red circle", None, current)
    recorder.verify("a photo of a red circle and a blue square", PLAN, current, steps)
    recorder.correct("a photo of a red circle and a blue square", PLAN, VERDICT, current, steps)
    calls = [json.loads(c.model_dump_json()) for c in recorder.take()]  # through JSON, as on disk
    replies = [PLAN.model_dump_json(exclude={"fallback"}), CHECK.model_dump_json(), CHECK.model_dump_json(),
               VERDICT.model_dump_json(), CORRECTION_JSON]
    fake = RecordingFake(messages=iter(replies))
    ctl = ChatModelController(fake, image_size=64, history_token_budget=budget, history_images=2,
                              use_structured_output=False)
    ctl.plan("a photo of a red circle and a blue square")
    ctl.check_step("add a blue square", before, current)
    ctl.check_step("a photo of a red circle", None, current)
    ctl.verify("a photo of a red circle and a blue square", PLAN, current, steps)
    ctl.correct("a photo of a red circle and a blue square", PLAN, VERDICT, current, steps)
    assert len(fake.calls) == len(calls) == 5
    for sent, record in zip(fake.calls, calls):
        call = ControllerCall.model_validate(record).resolved(tmp_path / "data")
        if record["image"] is not None:
            assert record["image"]["path"].startswith("images/")  # relative to the dataset folder
        train = training_conversation(call, opts)
        assert train[-1] == {"role": "assistant", "content": call.reply}
        inference = processor_inputs(processor, to_qwen_conversation(sent), True)
        trained = processor_inputs(processor, train[:-1], True)
        assert inference["input_ids"].tolist() == trained["input_ids"].tolist()
        if "pixel_values" in inference:
            assert torch.equal(inference["pixel_values"], trained["pixel_values"])
    verify_images = sum(b["type"] == "image" for b in training_conversation(
        ControllerCall.model_validate(calls[3]).resolved(tmp_path / "data"), opts)[1]["content"])
    assert verify_images == {2048: 3, 70: 2, 0: 1}[budget]  # history canvases within the budget + the current one


def test_mask_is_the_assistant_reply_under_the_real_qwen3_vl_template(tmp_path, tiny):
    _, processor = tiny
    assert processor.chat_template == QWEN3_VL_CHAT_TEMPLATE
    assert "{%- set image_count = namespace(value=0) %}" in QWEN3_VL_CHAT_TEMPLATE
    store = ArtifactStore(tmp_path / "run")
    steps = history(store, 3)
    recorder = RecordingController(Teacher(), tmp_path / "data")
    recorder.verify("a photo of a red circle and a blue square", PLAN, steps[-1].canvas.open(), steps)
    recorder.plan("a photo of a red circle and a blue square")
    calls = [c.resolved(tmp_path / "data") for c in recorder.take()]
    opts = RenderOptions(image_size=64)
    convs = [training_conversation(c, opts) for c in calls]
    batch = AssistantOnlyCollator(processor, image_size=64)(convs)
    tok = processor.tokenizer
    for ids, labels, call in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), calls):
        target = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tok.decode(target) == call.reply + "<|im_end|>"
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\nYou are the controller")
        assert "<|im_end|>\n<|im_start|>assistant\n" + call.reply + "<|im_end|>\n" in text
    assert int((batch["input_ids"][0] == tok.convert_tokens_to_ids("<|vision_start|>")).sum()) == 3


def test_a_thinking_reply_is_parsed_after_the_last_think_end():
    reply = ('The verdict could be {"satisfied": true, "score": 1.0} but c1 fails.\n</think>\n\n'
             '{"satisfied": false, "score": 0.5, "constraints": [], "summary": "c1"}')
    assert extract_json(reply) == {"satisfied": False, "score": 0.5, "constraints": [], "summary": "c1"}
    assert extract_json("<think>a {\"x\": 1}</think>{\"y\": 2}") == {"y": 2}
    assert extract_json('```json\n{"y": 3}\n```') == {"y": 3}


def test_a_thinking_checkpoint_gets_the_larger_reply_budget(tmp_path, tiny):
    model, processor = tiny
    assert not is_thinking(processor)
    model.save_pretrained(tmp_path / "instruct")
    processor.save_pretrained(tmp_path / "instruct")
    assert load_qwen3_vl_controller(str(tmp_path / "instruct"), device="cpu").model.max_new_tokens == 512
    # Qwen3-VL Thinking templates end the generation prompt with an open think block.
    thinking = QWEN3_VL_CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n",
                                              "{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}\n")
    assert thinking != QWEN3_VL_CHAT_TEMPLATE
    processor.chat_template = thinking
    try:
        assert is_thinking(processor)
        model.save_pretrained(tmp_path / "thinking")
        processor.save_pretrained(tmp_path / "thinking")
    finally:
        processor.chat_template = QWEN3_VL_CHAT_TEMPLATE
    ctl = load_qwen3_vl_controller(str(tmp_path / "thinking"), device="cpu")
    assert ctl.model.max_new_tokens == 4096
    assert load_qwen3_vl_controller(str(tmp_path / "thinking"), device="cpu", max_new_tokens=64).model.max_new_tokens == 64


def test_controller_settings_travel_with_the_folder(tmp_path, tiny):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / "clvr_controller.json").write_text(json.dumps({"image_size": 128, "history_images": 1}))
    ctl = load_qwen3_vl_controller(str(tmp_path), device="cpu")
    assert (ctl.image_size, ctl.history_images) == (128, 1)
    assert load_qwen3_vl_controller(str(tmp_path), device="cpu", image_size=64).image_size == 64
    (tmp_path / "clvr_controller.json").write_text(json.dumps({"image_sise": 128}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_qwen3_vl_controller(str(tmp_path), device="cpu")


def test_synth_records_every_teacher_call_with_exact_verdicts(tmp_path):
    from clvr_agent.tools.registry import get_controller, get_executor
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController

    out = tmp_path / "data"
    report = synthesize(SynthConfig(out=str(out), n=6, progress=False, max_iterations=4, record_calls=True,
                                    prompts="geneval"), get_executor("shapeworld"), get_controller("shapeworld"))
    lines = (out / "calls-00000-of-00001.jsonl").read_text().splitlines()
    calls = [ControllerCall.model_validate_json(ln) for ln in lines]
    assert {c.task for c in calls} == {"plan", "check", "verify", "correct"}
    assert {c.meta["index"] for c in calls} == set(range(6))  # kept or not, every prompt tried
    assert report.tried == 6
    exact = ShapeWorldController()
    verdicts = [c for c in calls if c.task == "verify"]
    assert any(json.loads(c.reply)["satisfied"] for c in verdicts)
    assert any(not json.loads(c.reply)["satisfied"] for c in verdicts)
    for c in verdicts:
        c = c.resolved(out)
        assert Verdict.model_validate_json(c.reply) == exact.verify(c.prompt, c.plan, c.image.open(), [])
    ds = TrajectoryDialogueDataset.from_path(out, image_size=64)
    assert len(ds) == len(calls) - sum(c.task == "plan" for c in calls) + 6  # the judge's re-plans kept once
    conv = ds[0]
    assert conv[0]["role"] == "system" and "Reply with only one JSON object" in conv[0]["content"]
