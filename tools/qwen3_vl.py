"""Qwen3-VL as a controller: a local transformers model behind a small LangChain chat-model adapter.

The adapter turns LangChain messages (text and base64 image blocks) into the processor's chat
template and runs ``generate``, so a local VLM goes through exactly the same controller code
(:class:`ChatModelController`) as a served chat model. Only safetensors are loaded and
``trust_remote_code`` stays off; a local folder never triggers a download.

``vlm`` is a hub id, a local folder, or a name of a checkpoint shipped in the package
(``clvr-mini-vlm``). A folder may hold ``clvr_controller.json``: the controller settings it was
trained with (``image_size``, ``history_token_budget``, ``history_images``, ``max_new_tokens``),
used unless the caller passes them. Thinking checkpoints (their template opens ``<think>`` in the
prompt) get a larger reply budget, and their answer is read after the last ``</think>``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image

from clvr_agent.tools.chat_controller import ChatModelController
from clvr_agent.tools.conversation import to_processor_conversation
from clvr_agent.tools.loading import default_device, model_source, parse_dtype, shipped_model

# Checkpoints shipped inside the package, by name (``--vlm clvr-mini-vlm``).
SHIPPED = ("clvr-mini-vlm",)
CONTROLLER_SETTINGS = "clvr_controller.json"
_CONTROLLER_KEYS = ("image_size", "history_token_budget", "history_images", "max_new_tokens")
# Reply budgets: an Instruct model answers in one JSON object; a Thinking model reasons first.
MAX_NEW_TOKENS = 512
MAX_NEW_TOKENS_THINKING = 4096

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class Qwen3VLChatModel(BaseChatModel):
    """A LangChain chat model over a loaded ``Qwen3VLForConditionalGeneration`` and its processor."""

    model: Any
    processor: Any
    max_new_tokens: int = 512
    do_sample: bool = False

    @property
    def _llm_type(self) -> str:
        return "qwen3-vl"

    @property
    def _identifying_params(self) -> dict:
        return {"model": getattr(self.model, "name_or_path", ""), "max_new_tokens": self.max_new_tokens}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = self.reply(to_qwen_conversation(messages))
        for s in stop or []:
            text = text.split(s, 1)[0]
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text))])

    @torch.no_grad()
    def reply(self, conversation: list[dict]) -> str:
        """Greedy (by default) continuation of a processor-format conversation, special tokens removed."""
        inputs = self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (1, prompt + new) -> (1, new)
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]


def to_qwen_conversation(messages: list[BaseMessage]) -> list[dict]:
    """LangChain messages -> the processor's chat format; images become ``{"type": "image"}`` with pixels."""
    conversation = []
    for message in messages:
        if message.type not in _ROLES:
            raise ValueError(f"Qwen3-VL adapter cannot send a {message.type!r} message")
        blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
        content = []
        for block in blocks:
            if isinstance(block, str):
                content.append({"type": "text", "text": block})
            elif block["type"] == "text":
                content.append({"type": "text", "text": block["text"]})
            elif block["type"] in ("image_url", "image"):
                content.append({"type": "image", "image": _decode_image(block)})
            else:
                raise ValueError(f"Qwen3-VL adapter cannot send a {block['type']!r} content block")
        conversation.append({"role": _ROLES[message.type], "content": content})
    # The same last step as VLM SFT's conversations, so both reach the chat template identically.
    return to_processor_conversation(conversation)


def _decode_image(block: dict) -> Image.Image:
    """Pixels of an ``image_url`` data-URL block or a standard base64 ``image`` block."""
    if block["type"] == "image_url":
        url = block["image_url"]["url"] if isinstance(block["image_url"], dict) else block["image_url"]
        if not url.startswith("data:") or ";base64," not in url:
            raise ValueError("Qwen3-VL adapter takes only base64 data-URL images, not remote URLs")
        data = url.split(";base64,", 1)[1]
    elif "base64" in block:
        data = block["base64"]
    else:
        raise ValueError("Qwen3-VL adapter takes only base64 image blocks")
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return im.convert("RGB")


def load_qwen3_vl(
    vlm: str, torch_dtype: Union[str, Any] = "auto", device: Optional[str] = None
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a hub id or a local folder (safetensors, no remote code)."""
    from safetensors import SafetensorError
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    source, local = _resolve_source(vlm)
    torch_dtype, device = parse_dtype(torch_dtype, allow_auto=True), default_device(device)
    where = f"local folder {source}" if local else f"hub id {source!r}"
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            source,
            dtype=torch_dtype,
            device_map=device,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=local,
        )
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False, local_files_only=local)
    except (OSError, ValueError, SafetensorError) as e:
        raise OSError(
            f"could not load Qwen3-VL from {where}: expected config.json, *.safetensors weights and the "
            f"processor/tokenizer files of a Qwen3VLForConditionalGeneration checkpoint ({e})"
        ) from e
    if model.config.model_type != "qwen3_vl":
        raise ValueError(f"{where} holds a {model.config.model_type!r} model, expected 'qwen3_vl'")
    model.eval()
    return model, processor


def load_qwen3_vl_controller(
    vlm: str,
    torch_dtype: Union[str, Any] = "auto",
    device: Optional[str] = None,
    max_new_tokens: Optional[int] = None,
    **controller_kw,
) -> ChatModelController:
    """The ``qwen3-vl`` controller: a local Qwen3-VL behind :class:`ChatModelController`.

    Settings the caller leaves out come from the folder's ``clvr_controller.json``; ``max_new_tokens``
    then defaults to 512, or 4096 for a Thinking checkpoint.
    """
    model, processor = load_qwen3_vl(vlm, torch_dtype=torch_dtype, device=device)
    saved = controller_settings(vlm)
    for key in ("image_size", "history_token_budget", "history_images"):
        if key in saved:
            controller_kw.setdefault(key, saved[key])
    if max_new_tokens is None:
        max_new_tokens = saved.get("max_new_tokens") or (
            MAX_NEW_TOKENS_THINKING if is_thinking(processor) else MAX_NEW_TOKENS)
    chat = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=max_new_tokens)
    controller_kw.setdefault("name", "qwen3-vl")
    return ChatModelController(chat, **controller_kw)


def is_thinking(processor) -> bool:
    """True when the chat template opens a ``<think>`` block in the generation prompt (Thinking checkpoints)."""
    text = processor.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                         tokenize=False)
    return text.rstrip().endswith("<think>")


def controller_settings(vlm: str) -> dict:
    """The folder's ``clvr_controller.json`` (the settings it was trained with), or {} for a hub id."""
    source, local = _resolve_source(vlm)
    path = Path(source) / CONTROLLER_SETTINGS
    if not local or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    unknown = sorted(set(saved) - set(_CONTROLLER_KEYS))
    if not isinstance(saved, dict) or unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {', '.join(_CONTROLLER_KEYS)}")
    return saved


def _resolve_source(vlm: str) -> tuple[str, bool]:
    """(source, is_local). A shipped name or an existing path must be a complete folder; else a hub id."""
    if vlm in SHIPPED:
        vlm = str(shipped_model(vlm))
    path = model_source(vlm, "Qwen3-VL folder")
    if path is not None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Qwen3-VL folder {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"Qwen3-VL folder {path} has no *.safetensors weights (only safetensors are loaded)"
            )
        return str(path), True
    return vlm, False
