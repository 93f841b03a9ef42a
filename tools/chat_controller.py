"""A controller backed by any LangChain chat model that accepts image content blocks.

Every call is rendered by :mod:`clvr_agent.tools.conversation` (the renderer VLM SFT trains on);
images go out as base64 PNG data-URL blocks, downscaled to ``image_size`` and built only for the call. Replies are pydantic records: through ``with_structured_output`` where the model supports
it, else as JSON extracted from the text. An invalid reply is answered with its validation error,
at most ``max_retries`` times, then :class:`ControllerOutputError` ends the step cleanly.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any, Callable, Literal, Optional, TypeVar, Union

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from PIL import Image
from pydantic import BaseModel

from clvr_agent.tools import conversation, prompts
from clvr_agent.errors import ControllerOutputError

# Re-exported: the renderer owns them, callers of this module keep their imports.
from clvr_agent.tools.conversation import (  # noqa: F401
    CHARS_PER_TOKEN,
    PIXELS_PER_IMAGE_TOKEN,
    PlanReply,
    downscale,
    estimate_tokens,
    image_tokens,
)
from clvr_agent.types import Correction, PassiveCheck, Plan, Step, Verdict

R = TypeVar("R", bound=BaseModel)


class ChatModelController:
    """The :class:`~clvr_agent.protocols.Controller` protocol on top of a LangChain chat model."""

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
    # Every call is rendered by clvr_agent.tools.conversation, the renderer VLM SFT trains on.

    def render_options(self, schema: type[BaseModel]) -> conversation.RenderOptions:
        return conversation.RenderOptions(
            image_size=self.image_size, history_token_budget=self.history_token_budget,
            history_images=self.history_images, schema_in_text=self._structured_runnable(schema) is None)

    def plan(self, prompt: str) -> Plan:
        messages = conversation.plan_messages(prompt, self.render_options(PlanReply))
        reply = self._ask(to_langchain(messages), PlanReply, _check_plan)
        return Plan(**reply.model_dump(), fallback=False)

    def check_step(self, instruction: str, before: Optional[Image.Image], after: Image.Image) -> PassiveCheck:
        messages = conversation.check_messages(instruction, before, after, self.render_options(PassiveCheck))
        return self._ask(to_langchain(messages), PassiveCheck)

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        messages = conversation.verify_messages(prompt, plan, canvas, history, self.render_options(Verdict))
        ids = [c.id for c in plan.constraints]
        return self._ask(to_langchain(messages), Verdict, lambda v: _check_verdict(v, ids))

    def correct(
        self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]
    ) -> Correction:
        messages = conversation.correct_messages(prompt, plan, verdict, canvas, history,
                                                 self.render_options(Correction))
        return self._ask(to_langchain(messages), Correction, lambda c: _check_correction(c, canvas.size))

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


# -- helpers (module level so tests and the Qwen3-VL adapter can use them) ------------------


def image_block(image: Image.Image) -> dict:
    """An OpenAI-style ``image_url`` content block holding a base64 PNG data URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
THINK_END = "</think>"


def extract_json(text: str) -> dict:
    """The first JSON object of the answer, tolerant of ```json fences and reasoning.

    The answer is what follows the last ``</think>``: a Thinking checkpoint's template opens
    ``<think>`` in the prompt, so its reply holds only the closing tag, and the reasoning before it
    may quote JSON fragments of its own.
    """
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
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


def to_langchain(messages: list[dict]) -> list[BaseMessage]:
    """Rendered messages (:mod:`~clvr_agent.tools.conversation`) -> LangChain messages, images as PNG data URLs."""
    out: list[BaseMessage] = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [image_block(b["image"]) if b["type"] == "image" else dict(b) for b in content]
        out.append(SystemMessage(content) if m["role"] == "system" else HumanMessage(content))
    return out


def _short(error: Optional[Exception], limit: int = 1000) -> str:
    message = str(error)
    return message if len(message) <= limit else message[:limit] + " ..."


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
