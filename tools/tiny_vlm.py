"""A tiny Qwen3-VL from the real transformers classes, built offline (tests and smoke runs).

The model is a real ``Qwen3VLForConditionalGeneration`` (about 150k parameters) and the processor
a real ``Qwen3VLProcessor`` over the byte-level tokenizer of :mod:`clvr_agent.tools.tiny` with the
real Qwen3-VL chat template (:data:`QWEN3_VL_CHAT_TEMPLATE`), so ``save_pretrained`` gives a folder
that :func:`~clvr_agent.tools.qwen3_vl.load_qwen3_vl` loads exactly like a real checkpoint. Its
weights are random: it writes garbage. ``clvr-mini-vlm`` is built by the same functions at its size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from clvr_agent.tools.tiny import build_tokenizer

if TYPE_CHECKING:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

# The vision tower and the image processor must agree on these (patch 16, 2x2 merge): a 64x64
# image becomes a (1, 4, 4) grid of patches, i.e. 4 image tokens after merging.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64

# The chat template of Qwen/Qwen3-VL-8B-Instruct, written out from the chat_template.json published
# with that checkpoint on the Hugging Face hub (same text as every Qwen3-VL Instruct size).
QWEN3_VL_CHAT_TEMPLATE: str = json.loads(
    (Path(__file__).with_name("qwen3_vl_chat_template.json")).read_text())["chat_template"]


def build_tiny_processor(tokenizer=None, max_pixels: int = MAX_PIXELS) -> "Qwen3VLProcessor":
    """The real Qwen3-VL processor with small pixel bounds, so every image costs a few tokens.

    ``tokenizer`` defaults to the byte-level one; its chat template is replaced by Qwen3-VL's.
    """
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=max_pixels,
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def build_tiny_qwen3_vl(
    seed: int = 0, processor: Optional["Qwen3VLProcessor"] = None, *, hidden: int = 32, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, intermediate: int = 37, vision_hidden: int = 32, vision_depth: int = 2,
    max_positions: int = 4096, vision_positions: int = 16,
) -> tuple["Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"]:
    """A seeded random-weight ``(model, processor)`` pair; the defaults generate in milliseconds on CPU."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = processor if processor is not None else build_tiny_processor()
    tok = processor.tokenizer
    token_id = tok.convert_tokens_to_ids
    head_dim = hidden // heads
    if head_dim % 8:
        raise ValueError(f"hidden/heads = {head_dim} must be a multiple of 8 (the 3D rotary sections)")
    quarter = head_dim // 8  # mrope_section sums to head_dim / 2 (temporal, height, width rotary pairs)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act="silu",
            max_position_embeddings=max_positions,
            rope_parameters={"rope_type": "default", "mrope_section": [2 * quarter, quarter, quarter],
                             "mrope_interleaved": True, "rope_theta": 10000},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden,
            num_heads=4,
            in_channels=3,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            out_hidden_size=hidden,  # = text hidden_size
            num_position_embeddings=vision_positions,  # a square grid, interpolated to each image
            deepstack_visual_indexes=list(range(vision_depth)),
            hidden_act="gelu_pytorch_tanh",
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor

