"""The one renderer of controller conversations: what a chat-model controller sends for each call.

Both sides use it: :class:`~clvr_agent.tools.chat_controller.ChatModelController` at inference and
VLM SFT (:mod:`clvr_agent.training.sft_vlm`), so SFT trains exactly the conversation inference sends:
the same system text (with the JSON schema in text mode), user text, history within one token budget
(text lines and earlier canvases share it) and image placement.

A rendered call is a list of messages ``{"role": "system" | "user", "content": str | [block, ...]}``
whose blocks are ``{"type": "text", "text": ...}`` or ``{"type": "image", "image": PIL.Image}``, the
image already downscaled (longer side ``image_size``). :func:`to_processor_conversation` turns it
into the chat format a Qwen3-VL processor takes; the Qwen3-VL adapter ends in the same function.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clvr_agent.tools import prompts
from clvr_agent.types import Constraint, Correction, ImageRef, PassiveCheck, Plan, Step, Verdict

# Qwen3-VL spends one token per 32x32 pixels (patch 16, merge 2); other VLMs are in the same range.
PIXELS_PER_IMAGE_TOKEN = 32 * 32
CHARS_PER_TOKEN = 4
TASKS = ("plan", "check", "verify", "correct")


class PlanReply(BaseModel):
    """What the model writes for a plan (``Plan.fallback`` is the graph's to set, not the model's)."""

    model_config = ConfigDict(extra="forbid")

    constraints: list[Constraint] = Field(min_length=1)
    first_instruction: str = Field(min_length=1)
    reasoning: str = ""


SCHEMAS: dict[str, type[BaseModel]] = {"plan": PlanReply, "check": PassiveCheck, "verify": Verdict,
                                       "correct": Correction}
SYSTEMS = {"plan": prompts.PLAN_SYSTEM, "check": prompts.CHECK_SYSTEM, "verify": prompts.VERIFY_SYSTEM,
           "correct": prompts.CORRECT_SYSTEM}


@dataclass(frozen=True)
class RenderOptions:
    """The controller settings that change what a call looks like (the SFT run must use the same)."""

    image_size: int = 512
    history_token_budget: int = 2048
    history_images: int = 2  # at most this many earlier canvases, within the same budget
    schema_in_text: bool = True  # False when the model replies through tool calling

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.history_token_budget < 0 or self.history_images < 0:
            raise ValueError("history_token_budget and history_images must be >= 0")


# -- the four calls ----------------------------------------------------------------------------


def system_text(task: str, schema_in_text: bool = True) -> str:
    """The task's system prompt, plus the reply's JSON schema in text mode."""
    if task not in SYSTEMS:
        raise ValueError(f"unknown controller task {task!r}; known: {', '.join(TASKS)}")
    if not schema_in_text:
        return SYSTEMS[task]
    schema = json.dumps(SCHEMAS[task].model_json_schema())
    return SYSTEMS[task] + "\n\n" + prompts.JSON_REPLY.format(schema=schema)


def plan_messages(prompt: str, opts: RenderOptions) -> list[dict]:
    return [_system("plan", opts), {"role": "user", "content": prompts.PLAN_USER.format(prompt=prompt)}]


def check_messages(instruction: str, before: Optional[Image.Image], after: Image.Image,
                   opts: RenderOptions) -> list[dict]:
    content = [_text(prompts.CHECK_USER.format(instruction=instruction))]
    if before is None:
        content.append(_text(prompts.CHECK_NO_BEFORE))
    else:
        content += [_text(prompts.BEFORE_LABEL), _image(before, opts)]
    content += [_text(prompts.AFTER_LABEL), _image(after, opts)]
    return [_system("check", opts), {"role": "user", "content": content}]


def verify_messages(prompt: str, plan: Plan, canvas: Image.Image, history: Sequence[Step],
                    opts: RenderOptions) -> list[dict]:
    history_text, history_blocks = render_history(history, canvas, opts)
    text = prompts.VERIFY_USER.format(prompt=prompt, constraints=constraint_lines(plan.constraints),
                                      history=history_text)
    content = [_text(text), *history_blocks, _text(prompts.CURRENT_CANVAS_LABEL), _image(canvas, opts)]
    return [_system("verify", opts), {"role": "user", "content": content}]


def correct_messages(prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: Sequence[Step],
                     opts: RenderOptions) -> list[dict]:
    history_text, history_blocks = render_history(history, canvas, opts)
    unmet_ids = {c.id for c in verdict.unmet()}
    unmet = [c for c in plan.constraints if c.id in unmet_ids]
    text = prompts.CORRECT_USER.format(
        prompt=prompt,
        constraints=constraint_lines(plan.constraints),
        unmet=constraint_lines(unmet) if unmet else prompts.HISTORY_EMPTY,
        summary=verdict.summary or prompts.HISTORY_EMPTY,
        history=history_text,
        width=canvas.width,
        height=canvas.height,
    )
    content = [_text(text), *history_blocks, _text(prompts.CURRENT_CANVAS_LABEL), _image(canvas, opts)]
    return [_system("correct", opts), {"role": "user", "content": content}]


def render_history(history: Sequence[Step], canvas: Image.Image, opts: RenderOptions) -> tuple[str, list[dict]]:
    """The most recent steps that fit the token budget, as text, plus earlier canvases within the same budget.

    Walks back from the newest step: each line costs its estimated tokens; a step's canvas (not the
    current one, which is sent anyway) costs its image tokens after downscaling, and is sent while the
    budget and the ``history_images`` cap allow. Lines come oldest first; canvases oldest first.
    """
    budget = opts.history_token_budget
    lines: list[str] = []
    images: list[tuple[int, Image.Image]] = []
    for step in reversed(history):
        line = step_line(step)
        if estimate_tokens(line) > budget:
            break
        budget -= estimate_tokens(line)
        lines.append(line)
        if step.canvas is None or len(images) >= opts.history_images:
            continue
        pixels = step.canvas.open()
        if same_pixels(pixels, canvas):
            continue
        small = downscale(pixels, opts.image_size)
        if image_tokens(small) <= budget:
            budget -= image_tokens(small)
            images.append((step.index, small))
    omitted = len(history) - len(lines)
    lines.reverse()
    if omitted:
        lines.insert(0, prompts.HISTORY_OMITTED.format(count=omitted))
    blocks: list[dict] = []
    for index, small in reversed(images):
        blocks += [_text(prompts.HISTORY_IMAGE_LABEL.format(index=index)), {"type": "image", "image": small}]
    return "\n".join(lines) or prompts.HISTORY_EMPTY, blocks


# -- a recorded call (what `clvr synth` writes and VLM SFT reads) ----------------------------------


class ControllerCall(BaseModel):
    """One controller call as data: its inputs (images as refs) and the reply JSON the model should write.

    ``image`` is the canvas judged: the step's result for ``check`` (with ``before``, None for a first
    step), the current canvas for ``verify`` and ``correct``. ``meta`` is free-form provenance
    (teacher, prompt index, tag, tier) that is never rendered.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["plan", "check", "verify", "correct"]
    prompt: str = ""
    plan: Optional[Plan] = None
    instruction: str = ""
    before: Optional[ImageRef] = None
    image: Optional[ImageRef] = None
    history: list[Step] = Field(default_factory=list)
    verdict: Optional[Verdict] = None
    reply: str
    meta: dict = Field(default_factory=dict)

    def resolved(self, root: Path) -> "ControllerCall":
        """A copy whose relative image paths point under ``root`` (a synth folder)."""
        def fix(ref: Optional[ImageRef]) -> Optional[ImageRef]:
            if ref is None or Path(ref.path).is_absolute():
                return ref
            return ref.model_copy(update={"path": str(root / ref.path)})

        history = [s.model_copy(update={"canvas": fix(s.canvas)}) for s in self.history]
        return self.model_copy(update={"before": fix(self.before), "image": fix(self.image), "history": history})


def call_messages(call: ControllerCall, opts: RenderOptions) -> list[dict]:
    """The messages the controller sends for a recorded call (images opened from their refs)."""
    def need(value, what: str):
        if value is None:
            raise ValueError(f"a recorded {call.task} call has no {what}")
        return value

    if call.task == "plan":
        return plan_messages(call.prompt, opts)
    if call.task == "check":
        before = call.before.open() if call.before is not None else None
        return check_messages(call.instruction, before, need(call.image, "image").open(), opts)
    canvas = need(call.image, "image").open()
    if call.task == "verify":
        return verify_messages(call.prompt, need(call.plan, "plan"), canvas, call.history, opts)
    return correct_messages(call.prompt, need(call.plan, "plan"), need(call.verdict, "verdict"), canvas,
                            call.history, opts)


def training_conversation(call: ControllerCall, opts: RenderOptions) -> list[dict]:
    """Processor-format conversation of a recorded call with its reply as the assistant turn."""
    return to_processor_conversation(call_messages(call, opts)) + [{"role": "assistant", "content": call.reply}]


# -- the chat format a processor takes -----------------------------------------------------------


def to_processor_conversation(messages: Sequence[dict]) -> list[dict]:
    """Rendered (or adapter-decoded) messages -> processor chat format; text-only content becomes one string.

    Plain strings keep every chat template happy (system turns in particular); images stay blocks
    ``{"type": "image", "image": PIL}`` in place.
    """
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [dict(b) for b in content]
            if all(b["type"] == "text" for b in content):
                content = "".join(b["text"] for b in content)
        out.append({"role": message["role"], "content": content})
    return out


# -- helpers ----------------------------------------------------------------------------------


def downscale(image: Image.Image, size: int) -> Image.Image:
    """An RGB copy whose longer side is at most ``size`` (aspect kept, never upscaled)."""
    small = image.convert("RGB")  # always a copy
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def image_tokens(image: Image.Image) -> int:
    return math.ceil(image.width * image.height / PIXELS_PER_IMAGE_TOKEN)


def constraint_lines(constraints: Sequence[Constraint]) -> str:
    return "\n".join(f"- {c.id} ({c.kind}): {c.text}" for c in constraints)


def step_line(step: Step) -> str:
    line = f"step {step.index} (iteration {step.iteration}, {step.request.mode}): {step.instruction}"
    if step.passive is not None:
        line += f" | step check: {'done' if step.passive.executed else 'not done'}"
        line += f" ({step.passive.detail})" if step.passive.detail else ""
    if step.verdict is not None:
        line += f" | verdict: score {step.verdict.score:.2f}"
        line += f", {step.verdict.summary}" if step.verdict.summary else ""
    if not step.accepted:
        line += " | rejected"
    if step.error:
        line += f" | error: {step.error}"
    return line


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def _system(task: str, opts: RenderOptions) -> dict:
    return {"role": "system", "content": system_text(task, opts.schema_in_text)}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(image: Image.Image, opts: RenderOptions) -> dict:
    return {"type": "image", "image": downscale(image, opts.image_size)}
