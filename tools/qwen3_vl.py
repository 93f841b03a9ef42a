"""Qwen3-VL as a controller: a local transformers model behind a small LangChain chat-model adapter.

The adapter turns LangChain messages (text and base64 image blocks) into the processor's chat
template and runs ``generate``, so a local VLM goes through exactly the same controller code
(:class:`ChatModelController`) as a served chat model. Only safetensors are loaded and
``trust_remote_code`` stays off; a local folder never triggers a download.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Optional, Union

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image

from clvr_agent.tools.chat_controller import ChatModelController

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
        if all(c["type"] == "text" for c in content):
            # Plain strings keep every chat template happy (system turns in particular).
            content = "".join(c["text"] for c in content)
        conversation.append({"role": _ROLES[message.type], "content": content})
    return conversation


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
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise ValueError(f"unknown torch dtype {torch_dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
        torch_dtype = getattr(torch, torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    max_new_tokens: int = 512,
    **controller_kw,
) -> ChatModelController:
    """The ``qwen3-vl`` controller: a local Qwen3-VL behind :class:`ChatModelController`."""
    model, processor = load_qwen3_vl(vlm, torch_dtype=torch_dtype, device=device)
    chat = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=max_new_tokens)
    controller_kw.setdefault("name", "qwen3-vl")
    return ChatModelController(chat, **controller_kw)


def _resolve_source(vlm: str) -> tuple[str, bool]:
    """(source, is_local). An existing path must be a complete folder; anything else is a hub id."""
    path = Path(vlm).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"Qwen3-VL path {path} is a file; expected a checkpoint folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Qwen3-VL folder {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"Qwen3-VL folder {path} has no *.safetensors weights (only safetensors are loaded)"
            )
        return str(path), True
    # A hub id is "owner/name"; anything else that does not exist was meant as a folder.
    if vlm.startswith((".", "/", "~")) or vlm.count("/") != 1 or "\\" in vlm:
        raise FileNotFoundError(f"no Qwen3-VL folder at {path} (and {vlm!r} is not a hub id 'owner/name')")
    return vlm, False
