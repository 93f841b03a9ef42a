"""A tiny Qwen3-VL from the real transformers classes, built offline (tests and smoke runs).

The model is a real ``Qwen3VLForConditionalGeneration`` (about 150k parameters) and the processor
a real ``Qwen3VLProcessor`` over the byte-level tokenizer of :mod:`clvr_agent.tools.tiny`, so
``save_pretrained`` gives a folder that :func:`~clvr_agent.tools.qwen3_vl.load_qwen3_vl` loads
exactly like a real checkpoint. Its weights are random: it writes garbage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clvr_agent.tools.tiny import CHAT_TEMPLATE, build_tokenizer

if TYPE_CHECKING:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

# The vision tower and the image processor must agree on these (patch 16, 2x2 merge): a 64x64
# image becomes a (1, 4, 4) grid of patches, i.e. 4 image tokens after merging.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64


def build_tiny_processor() -> "Qwen3VLProcessor":
    """The real Qwen3-VL processor with small pixel bounds, so every image costs a few tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen3_vl(seed: int = 0) -> tuple["Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"]:
    """A seeded random-weight ``(model, processor)`` pair that generates in milliseconds on CPU."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = build_tiny_processor()
    tok = processor.tokenizer
    token_id = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            hidden_act="silu",
            max_position_embeddings=4096,
            # mrope_section sums to head_dim / 2 (temporal, height, width rotary pairs).
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 10000},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=32,
            num_heads=4,
            in_channels=3,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            out_hidden_size=32,  # = text hidden_size
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
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
