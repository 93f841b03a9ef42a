"""Every private diffusers helper the trainers use, in one place (written against diffusers 0.42).

Training goes through `Flux2KleinPipeline`'s public methods where they exist (``encode_prompt``,
``prepare_latents``, ``prepare_image_latents``); what remains has no public form: encoding a prompt
through a *trainable* (DDP-wrapped) text encoder, the raw (un-normalised) VAE latents the batch-norm
statistics are computed from, and unpacking a sample for decoding. If a diffusers release renames one of
these, this file is the one to change.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

__all__ = ["compute_empirical_mu", "retrieve_timesteps", "prompt_embeds_with", "patchify", "unpack_tokens", "unpatchify"]


def prompt_embeds_with(pipe, text_encoder, prompts: Sequence[str], *, max_sequence_length: int,
                       out_layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompt`` with another text-encoder object (the prepared one, so gradients synchronise).

    Returns ``(B, L, len(out_layers)·hidden)`` embeddings in the transformer's dtype and ids ``(B, L, 4)``.
    """
    device = pipe.transformer.device
    embeds = pipe._get_qwen3_prompt_embeds(
        text_encoder=text_encoder, tokenizer=pipe.tokenizer, prompt=list(prompts), dtype=pipe.transformer.dtype,
        device=device, max_sequence_length=max_sequence_length, hidden_states_layers=tuple(out_layers))
    return embeds, pipe._prepare_text_ids(embeds).to(device)


def patchify(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H/8, W/8) -> (B, 4C, H/16, W/16)`` (2×2 patches), before BN normalisation."""
    return pipe._patchify_latents(latents)


def unpack_tokens(pipe, tokens: torch.Tensor, ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Target tokens ``(B, h·w, 4C) -> (B, 4C, h, w)`` by their position ids."""
    return pipe._unpack_latents_with_ids(tokens, ids, h, w)


def unpatchify(pipe, latents: torch.Tensor) -> torch.Tensor:
    """``(B, 4C, h, w) -> (B, C, 2h, 2w)``, the VAE decoder's input."""
    return pipe._unpatchify_latents(latents)
