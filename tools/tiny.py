"""Tiny models from the real diffusers/transformers classes, built offline: the one place they are made.

Tests, benchmarks and training all build their small models here, so a tiny FLUX.2 [klein] pipeline
is always the same real ``Flux2KleinPipeline`` (``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``,
``Qwen3ForCausalLM``, ``FlowMatchEulerDiscreteScheduler``) that ``Flux2KleinExecutor`` loads from a
folder; only the sizes differ. Nothing here touches the model hub.

Text-encoder out-layers. FLUX.2 [klein] builds its prompt embedding by stacking the text encoder's
hidden states ``TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)`` (diffusers' default), so the transformer's
``joint_attention_dim`` is ``3 × text hidden``. Rather than storing a custom layer list next to the
weights, the tiny text encoder has exactly 27 (very narrow) layers, so the default is right for every
checkpoint built here and survives ``save_pretrained``/``from_pretrained`` with nothing extra on disk;
the executor checks the rule on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clvr_agent.tools.flux2_klein import TEXT_ENCODER_OUT_LAYERS

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen2Tokenizer

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen3-style chat template, minimal: string or block content, images as one vision placeholder
# (a processor expands <|image_pad|> to the real token count), and the empty think block Qwen3
# writes when ``enable_thinking=False`` (FLUX.2 [klein] encodes prompts that way).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] in ('image', 'image_url') -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif block['type'] == 'text' -%}{{ block['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# Kwargs for build_tiny_flux2_klein() used by `clvr bench`: one transformer forward must dominate the
# per-call fixed cost C (text encoder + VAE + loop). The loop-speed target (speedup / NFE ratio >= 0.85
# for 28-step CFG vs 4-step) needs F >= 1.3 C; this size measured F = 0.31 s vs C = 0.06 s (about 5x) at
# 64x64 on the project's 2-core CPU with 1 thread, and keeps a base 2-iteration loop near half a minute.
# (A larger variant, layers=2/single_layers=8, gave F = 1.86 s: 13.6x, but 3+ minutes per base loop.)
BENCH_SIZE: dict = dict(
    layers=1, single_layers=4, heads=8, head_dim=64, text_hidden=32, vae_channels=(8, 16), latent_channels=8,
    max_sequence_length=64,
)


def build_tokenizer() -> "Qwen2Tokenizer":
    """A byte-level BPE Qwen2Tokenizer with no merges (one token per byte) plus Qwen's special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_flux2_klein(
    *,
    distilled: bool = True,
    seed: int = 0,
    layers: int = 1,
    single_layers: int = 1,
    heads: int = 2,
    head_dim: int = 16,
    text_hidden: int = 16,
    vae_channels: tuple[int, ...] = (8, 8),
    latent_channels: int = 4,
    max_sequence_length: int = 256,
) -> "Flux2KleinPipeline":
    """A random-weight Flux2KleinPipeline; the defaults run a 64×64, 4-step call in tens of milliseconds.

    ``heads × head_dim`` is the transformer width; the VAE downsamples by ``2 ** (len(vae_channels) - 1)``
    and the transformer sees ``4 × latent_channels`` channels per token (2×2 patches). Prompts are
    padded to ``max_sequence_length`` tokens (one per byte), stored as the tokenizer's
    ``model_max_length`` so the executor reads it back from a saved folder.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (four RoPE axes of even size), got {head_dim}")
    if text_hidden % 2:
        raise ValueError(f"text_hidden must be even (two text attention heads), got {text_hidden}")

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_sequence_length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=layers,
            num_single_layers=single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=len(TEXT_ENCODER_OUT_LAYERS) * text_hidden,
            timestep_guidance_channels=256,
            axes_dims_rope=(head_dim // 4,) * 4,
            guidance_embeds=False,
        )
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=text_hidden,
                intermediate_size=2 * text_hidden,
                num_hidden_layers=max(TEXT_ENCODER_OUT_LAYERS),  # so the default out-layers exist
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=text_hidden // 2,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=tuple(vae_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    for module in (transformer, text_encoder, vae):
        module.eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )


# ---------------------------------------------------------------------------------------------------
# Tiny Qwen3-VL (controller) — reserved for build_tiny_qwen3_vl(), added by the controller engineer.
# Reuse build_tokenizer() above for its text side.
# ---------------------------------------------------------------------------------------------------
