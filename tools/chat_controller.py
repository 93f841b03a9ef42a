"""A controller backed by any LangChain chat model that accepts image content blocks.

Images go out as base64 PNG data-URL blocks, downscaled to ``image_size`` and built only for the
call. Replies are pydantic records: through ``with_structured_output`` where the model supports
it, else as JSON extracted from the text. An invalid reply is answered with its validation error,
at most ``max_retries`` times, then :class:`ControllerOutputError` ends the step cleanly.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from typing import Any, Callable, Literal, Optional, TypeVar, Union

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from clvr_agent.tools import prompts
from clvr_agent.tools.base import ControllerOutputError
from clvr_agent.types import (
    Constraint,
    Correction,
    PassiveCheck,
    Plan,
    Step,
    Verdict,
)

R = TypeVar("R", bound=BaseModel)

# Qwen3-VL spends one token per 32x32 pixels (patch 16, merge 2); other VLMs are in the same range.
PIXELS_PER_IMAGE_TOKEN = 32 * 32
CHARS_PER_TOKEN = 4


class PlanReply(BaseModel):
    """What the model writes for a plan (``Plan.fallback`` is the graph's to set, not the model's)."""

    model_config = ConfigDict(extra="forbid")

    constraints: list[Constraint] = Field(min_length=1)
    first_instruction: str = Field(min_length=1)
    reasoning: str = ""


class ChatModelController:
    """The :class:`~clvr_agent.tools.base.Controller` protocol on top of a LangChain chat model."""

    def __init__(
        self,
        model: BaseChatModel,
        *,
        image_size: int = 512,
        max_retries: int = 2,
        history_token_budget: int = 2048,
        history_images: int = 2,
        use_structured_output: Union[bool, Literal["auto"]] = "auto",
        name: str = "chat-model",
    ):
        if not isinstance(model, BaseChatModel):
            raise TypeError(f"model must be a langchain BaseChatModel, got {type(model).__name__}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if use_structured_output not in ("auto", True, False):
            raise ValueError(f"use_structured_output must be 'auto', True or False, got {use_structured_output!r}")
        self.model = model
        self.image_size = image_size
        self.max_retries = max_retries
        self.history_token_budget = history_token_budget
        self.history_images = history_images
        self.use_structured_output = use_structured_output
        self.name = name
        self._structured: dict[type, Any] = {}

    @classmethod
    def from_spec(
        cls,
        model: Optional[BaseChatModel] = None,
        base_url: Optional[str] = None,
        model_name: Optional[str] = None,
        api_key: Optional[str] = None,
        **kw,
    ) -> "ChatModelController":
        """Wrap a chat-model instance, or an OpenAI-compatible server (e.g. vLLM) at ``base_url``."""
        if model is not None and base_url is not None:
            raise ValueError("give either model (a chat-model instance) or base_url, not both")
        if model is not None:
            return cls(model, **kw)
        if base_url is None:
            raise ValueError(
                "the chat-model controller needs model=<langchain BaseChatModel> "
                "or base_url=<OpenAI-compatible server URL> with model_name=<served model>"
            )
        if not model_name:
            raise ValueError(f"model_name is required with base_url={base_url!r} (the name the server serves)")
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as e:
            raise ImportError(
                "base_url needs the langchain-openai package: pip install langchain-openai"
            ) from e
        # Local servers usually ignore the key, but the client refuses to start without one.
        chat = ChatOpenAI(base_url=base_url, model=model_name, api_key=api_key or "EMPTY", temperature=0)
        return cls(chat, **kw)

    # -- the Controller protocol ------------------------------------------------------------

    def plan(self, prompt: str) -> Plan:
        messages = [
            SystemMessage(self._system(prompts.PLAN_SYSTEM, PlanReply)),
            HumanMessage(prompts.PLAN_USER.format(prompt=prompt)),
        ]
        reply = self._ask(messages, PlanReply, _check_plan)
        return Plan(**reply.model_dump(), fallback=False)

    def check_step(self, instruction: str, before: Optional[Image.Image], after: Image.Image) -> PassiveCheck:
        content = [_text(prompts.CHECK_USER.format(instruction=instruction))]
        if before is None:
            content.append(_text(prompts.CHECK_NO_BEFORE))
        else:
            content += [_text(prompts.BEFORE_LABEL), self._image_block(before)]
        content += [_text(prompts.AFTER_LABEL), self._image_block(after)]
        messages = [SystemMessage(self._system(prompts.CHECK_SYSTEM, PassiveCheck)), HumanMessage(content)]
        return self._ask(messages, PassiveCheck)

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        history_text, history_blocks = self._history(history, canvas)
        text = prompts.VERIFY_USER.format(
            prompt=prompt, constraints=_constraint_lines(plan.constraints), history=history_text
        )
        content = [_text(text), *history_blocks, _text(prompts.CURRENT_CANVAS_LABEL), self._image_block(canvas)]
        messages = [SystemMessage(self._system(prompts.VERIFY_SYSTEM, Verdict)), HumanMessage(content)]
        ids = [c.id for c in plan.constraints]
        return self._ask(messages, Verdict, lambda v: _check_verdict(v, ids))

    def correct(
        self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]
    ) -> Correction:
        history_text, history_blocks = self._history(history, canvas)
        unmet_ids = {c.id for c in verdict.unmet()}
        unmet = [c for c in plan.constraints if c.id in unmet_ids]
        text = prompts.CORRECT_USER.format(
            prompt=prompt,
            constraints=_constraint_lines(plan.constraints),
            unmet=_constraint_lines(unmet) if unmet else prompts.HISTORY_EMPTY,
            summary=verdict.summary or prompts.HISTORY_EMPTY,
            history=history_text,
            width=canvas.width,
            height=canvas.height,
        )
        content = [_text(text), *history_blocks, _text(prompts.CURRENT_CANVAS_LABEL), self._image_block(canvas)]
        messages = [SystemMessage(self._system(prompts.CORRECT_SYSTEM, Correction)), HumanMessage(content)]
        return self._ask(messages, Correction, lambda c: _check_correction(c, canvas.size))

    # -- asking, parsing, retrying ----------------------------------------------------------

    def _ask(self, messages: list[BaseMessage], schema: type[R], check: Optional[Callable[[R], None]] = None) -> R:
        """Invoke until the reply validates (and passes ``check``); feed each error back."""
        messages = list(messages)
        error: Optional[Exception] = None
        for _ in range(self.max_retries + 1):
            text, parsed, error = self._call(messages, schema)
            if error is None:
                try:
                    if parsed is None:
                        parsed = schema.model_validate(extract_json(text))
                    if check is not None:
                        check(parsed)
                    return parsed
                except ValueError as e:  # pydantic.ValidationError and json errors are ValueErrors
                    error = e
            messages += [
                AIMessage(text or "(empty reply)"),
                HumanMessage(prompts.RETRY.format(error=_short(error))),
            ]
        raise ControllerOutputError(
            f"{self.name}: no valid {schema.__name__} after {self.max_retries + 1} attempts; "
            f"last error: {_short(error)}"
        ) from error

    def _call(self, messages: list[BaseMessage], schema: type[R]) -> tuple[str, Optional[R], Optional[Exception]]:
        """One model call: (reply text, parsed record or None, parsing error or None)."""
        structured = self._structured_runnable(schema)
        if structured is None:
            return self.model.invoke(messages).text, None, None
        out = structured.invoke(messages)
        raw: AIMessage = out["raw"]
        # A tool-calling reply has no text; show the model its arguments when asking it to retry.
        text = json.dumps(raw.tool_calls[0]["args"]) if raw.tool_calls else raw.text
        return text, out["parsed"], out["parsing_error"]

    def _structured_runnable(self, schema: type) -> Any:
        if self.use_structured_output is False:
            return None
        if schema not in self._structured:
            try:
                self._structured[schema] = self.model.with_structured_output(schema, include_raw=True)
            except NotImplementedError:
                if self.use_structured_output is True:
                    raise
                self._structured[schema] = None  # "auto": this model has no tool calling; parse text
        return self._structured[schema]

    def _system(self, prompt: str, schema: type[BaseModel]) -> str:
        if self._structured_runnable(schema) is not None:
            return prompt
        return prompt + "\n\n" + prompts.JSON_REPLY.format(schema=json.dumps(schema.model_json_schema()))

    # -- images and history -----------------------------------------------------------------

    def _image_block(self, image: Image.Image) -> dict:
        return image_block(downscale(image, self.image_size))

    def _history(self, history: list[Step], canvas: Image.Image) -> tuple[str, list[dict]]:
        """The most recent steps that fit the token budget, as text, plus a few of their canvases."""
        budget = self.history_token_budget
        lines: list[str] = []
        images: list[tuple[int, Image.Image]] = []
        for step in reversed(history):
            line = _step_line(step)
            if estimate_tokens(line) > budget:
                break
            budget -= estimate_tokens(line)
            lines.append(line)
            if step.canvas is None or len(images) >= self.history_images:
                continue
            pixels = step.canvas.open()
            if _same_pixels(pixels, canvas):
                continue  # the current canvas is sent anyway
            small = downscale(pixels, self.image_size)
            if image_tokens(small) <= budget:
                budget -= image_tokens(small)
                images.append((step.index, small))
        omitted = len(history) - len(lines)
        lines.reverse()
        if omitted:
            lines.insert(0, prompts.HISTORY_OMITTED.format(count=omitted))
        blocks: list[dict] = []
        for index, small in reversed(images):
            blocks += [_text(prompts.HISTORY_IMAGE_LABEL.format(index=index)), image_block(small)]
        return "\n".join(lines) or prompts.HISTORY_EMPTY, blocks


# -- helpers (module level so tests and the Qwen3-VL adapter can use them) ------------------


def downscale(image: Image.Image, size: int) -> Image.Image:
    """An RGB copy whose longer side is at most ``size`` (aspect kept, never upscaled)."""
    small = image.convert("RGB")  # always a copy
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small


def image_block(image: Image.Image) -> dict:
    """An OpenAI-style ``image_url`` content block holding a base64 PNG data URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def image_tokens(image: Image.Image) -> int:
    return math.ceil(image.width * image.height / PIXELS_PER_IMAGE_TOKEN)


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict:
    """The first JSON object in a reply, tolerant of ```json fences and <think> blocks."""
    text = _THINK.sub("", text)
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError(f"no JSON object found in the reply: {text[:200]!r}")


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _short(error: Optional[Exception], limit: int = 1000) -> str:
    message = str(error)
    return message if len(message) <= limit else message[:limit] + " ..."


def _constraint_lines(constraints: list[Constraint]) -> str:
    return "\n".join(f"- {c.id} ({c.kind}): {c.text}" for c in constraints)


def _step_line(step: Step) -> str:
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


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.convert("RGB").tobytes()


def _check_plan(reply: PlanReply) -> None:
    ids = [c.id for c in reply.constraints]
    if len(set(ids)) != len(ids) or not all(ids):
        raise ValueError(f"constraint ids must be non-empty and unique, got {ids}")


def _check_verdict(verdict: Verdict, plan_ids: list[str]) -> None:
    got = [c.id for c in verdict.constraints]
    if sorted(got) != sorted(plan_ids):
        raise ValueError(f"give exactly one result per constraint id {plan_ids}, got {got}")
    if verdict.satisfied != all(c.satisfied for c in verdict.constraints):
        raise ValueError("satisfied must be true exactly when every constraint is satisfied")


def _check_correction(correction: Correction, size: tuple[int, int]) -> None:
    if not correction.instruction.strip():
        raise ValueError("instruction must not be empty")
    if correction.mode != "inpaint":
        return
    r, (w, h) = correction.region, size
    if r is None:
        raise ValueError("mode 'inpaint' needs a region {x0, y0, x1, y1}")
    if not (0 <= r.x0 < r.x1 <= w and 0 <= r.y0 < r.y1 <= h):
        raise ValueError(f"region {r.model_dump()} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
