"""Flow matching for FLUX.2 [klein]: the sequence layout, the loss, the samplers.

Shared by trajectory SFT, distillation and PPRL, and built on the pipeline's public methods
(``encode_prompt``, ``prepare_latents``, ``prepare_image_latents``; the few private helpers left are in
:mod:`~clvr_agent.training.diffusers_adapter`) so that training sees exactly the sequence
`Flux2KleinPipeline` builds at inference: target latents packed as tokens, then each reference canvas as
extra tokens with its own time coordinate.

Convention (diffusers `FlowMatchEulerDiscreteScheduler`): ``x_σ = (1-σ)·x0 + σ·ε``, the transformer
predicts ``v ≈ ε - x0``, sampling runs σ from 1 to 0 and a step is ``x' = x + (σ' - σ)·v``.
Nothing here is under ``torch.no_grad``: trainers differentiate through these helpers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from clvr_agent.tools.flux2_klein import text_encoder_out_layers
from clvr_agent.training import diffusers_adapter as da

# ---------------------------------------------------------------------------------------------- text


def encode_text(
    pipe,
    prompts: Sequence[str],
    *,
    text_encoder=None,
    max_sequence_length: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings ``(B, L, len(layers)·hidden)`` and text ids ``(B, L, 4)``, as the pipeline makes them.

    The stacked hidden states are the checkpoint's own (``text_encoder_out_layers(pipe)``, as the executor
    uses). ``text_encoder``: the prepared (DDP) encoder when it trains, so gradients synchronise;
    otherwise the pipeline's public ``encode_prompt``.
    """
    layers = text_encoder_out_layers(pipe)
    if text_encoder is not None:
        return da.prompt_embeds_with(pipe, text_encoder, prompts, max_sequence_length=max_sequence_length, out_layers=layers)
    device = pipe.transformer.device
    embeds, text_ids = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length,
                                          text_encoder_out_layers=layers)
    return embeds.to(pipe.transformer.dtype), text_ids


def drop_conditions(prompts: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Replace each prompt by ``""`` with probability ``p``: the unconditional branch klein's CFG uses."""
    return ["" if rng.random() < p else s for s in prompts]


# --------------------------------------------------------------------------------------------- images


def to_pixels(pipe, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> ``(B, 3, H, W)`` in [-1, 1] via the pipeline's image processor."""
    px = pipe.image_processor.preprocess(list(images), height=height, width=width)
    return px.to(device=pipe.vae.device, dtype=pipe.vae.dtype)


def raw_latents(pipe, pixels: torch.Tensor, *, vae=None) -> torch.Tensor:
    """VAE posterior mode, patchified as the pipeline does: ``(B, 3, H, W) -> (B, 4C, H/16, W/16)``."""
    vae = vae if vae is not None else pipe.vae
    lat = vae.encode(pixels).latent_dist.mode()  # (B, C, H/8, W/8)
    return da.patchify(pipe, lat)


def _bn_mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def normalize_latents(pipe, lat: torch.Tensor) -> torch.Tensor:
    mean, std = _bn_mean_std(pipe.vae, lat)
    return (lat - mean) / std


def encode_images(pipe, pixels: torch.Tensor, *, vae=None) -> torch.Tensor:
    """Pixels -> normalised, patchified latents ``(B, 4C, h, w)``: what `_encode_vae_image` returns."""
    return normalize_latents(pipe, raw_latents(pipe, pixels, vae=vae))


@torch.no_grad()
def latent_bn_stats(pipe, pixel_batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the patchified latents of ``pixel_batches`` (iterable of tensors).

    A freshly initialised (or jointly trained) VAE has ``bn.running_mean = 0, running_var = 1``; the
    pipeline de-normalises with these at sampling time, so they must describe the training latents.
    """
    n, s, s2 = 0, None, None
    for px in pixel_batches:
        lat = raw_latents(pipe, px.to(pipe.vae.device, pipe.vae.dtype)).double()  # (B, 4C, h, w)
        x = lat.transpose(0, 1).reshape(lat.shape[1], -1)  # (4C, B·h·w)
        s = x.sum(1) if s is None else s + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        n += x.shape[1]
    if n == 0:
        raise ValueError("latent_bn_stats needs at least one image")
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    return mean.float(), var.float()


@torch.no_grad()
def set_latent_bn_stats(vae, mean: torch.Tensor, var: torch.Tensor) -> None:
    vae.bn.running_mean.copy_(mean.to(vae.bn.running_mean))
    vae.bn.running_var.copy_(var.to(vae.bn.running_var))


# ------------------------------------------------------------------------------------------ sequence


@dataclass
class Condition:
    """Everything the transformer sees besides the noisy target tokens."""

    prompt_embeds: torch.Tensor  # (B, L, D)
    text_ids: torch.Tensor  # (B, L, 4)
    ref_tokens: torch.Tensor | None = None  # (B, N_ref, 4C)
    ref_ids: torch.Tensor | None = None  # (B, N_ref, 4)

    def repeat_interleave(self, n: int) -> "Condition":
        r = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return Condition(r(self.prompt_embeds), r(self.text_ids), r(self.ref_tokens), r(self.ref_ids))


def pack_target(pipe, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 4C, h, w) -> tokens (B, h·w, 4C)`` and their position ids ``(B, h·w, 4)`` (time coordinate 0)."""
    b, c4 = lat.shape[:2]
    # With latents given, prepare_latents only packs them (its height/width shape the noise it would draw).
    tokens, ids = pipe.prepare_latents(b, c4 // 4, 0, 0, lat.dtype, lat.device, None, latents=lat)
    return tokens, ids.to(lat.device)


def reference_tokens(pipe, pixels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One example's reference canvases, each ``(1, 3, H, W)`` -> tokens ``(1, K·h·w, 4C)`` and ids ``(1, K·h·w, 4)``.

    `Flux2KleinPipeline.prepare_image_latents` itself: the k-th reference gets time coordinate ``10 + 10k``.
    """
    return pipe.prepare_image_latents(list(pixels), 1, None, pipe.vae.device, pipe.vae.dtype)


def pack_references(pipe, ref_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K, 3, H, W)`` reference canvases -> tokens ``(B, K·h·w, 4C)`` and ids ``(B, K·h·w, 4)``."""
    per_example = [reference_tokens(pipe, [ref_pixels[i, k : k + 1] for k in range(ref_pixels.shape[1])])
                   for i in range(ref_pixels.shape[0])]
    return torch.cat([t for t, _ in per_example]), torch.cat([i for _, i in per_example])


def make_condition(pipe, prompt_embeds, text_ids, ref_pixels: torch.Tensor | None) -> Condition:
    """The condition for ``(B, K, 3, H, W)`` reference canvases (in [-1, 1]) or none."""
    if ref_pixels is None or ref_pixels.shape[1] == 0:
        return Condition(prompt_embeds, text_ids)
    tokens, ids = pack_references(pipe, ref_pixels)
    return Condition(prompt_embeds, text_ids, tokens.to(prompt_embeds.dtype), ids.to(prompt_embeds.device))


def transformer_forward(transformer, x: torch.Tensor, x_ids: torch.Tensor, sigma: torch.Tensor, cond: Condition):
    """The transformer on ``[target tokens | reference tokens]``; returns the prediction for the whole sequence.

    ``x (B, N_t, C)``, ``sigma (B,)``; result ``(B, N_t + N_ref, C)``. Only ``[:, :N_t]`` is a velocity.
    """
    hidden, ids = x, x_ids
    if cond.ref_tokens is not None:
        hidden = torch.cat([x, cond.ref_tokens.to(x.dtype)], dim=1)
        ids = torch.cat([x_ids, cond.ref_ids], dim=1)
    dtype = cond.prompt_embeds.dtype
    return transformer(
        hidden_states=hidden.to(dtype),
        timestep=sigma.to(dtype),  # the pipeline passes t/1000, i.e. σ
        guidance=None,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids,
        img_ids=ids,
        return_dict=False,
    )[0]


def velocity(transformer, x, x_ids, sigma, cond: Condition) -> torch.Tensor:
    """Predicted velocity on the target tokens only, ``(B, N_t, C)``."""
    return transformer_forward(transformer, x, x_ids, sigma, cond)[:, : x.shape[1]]


def guided_velocity(transformer, x, x_ids, sigma, cond, uncond: Condition | None, guidance_scale: float):
    """Klein's CFG: ``v_u + w·(v_c - v_u)``; the unconditional branch carries no gradient (Flow-GRPO)."""
    v = velocity(transformer, x, x_ids, sigma, cond)
    if uncond is None or guidance_scale <= 1.0:
        return v
    with torch.no_grad():
        vu = velocity(transformer, x, x_ids, sigma, uncond)
    return vu + guidance_scale * (v - vu)


# ---------------------------------------------------------------------------------------------- loss


def sample_sigmas(
    n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Logit-normal σ ∈ (0, 1) (SD3 / FLUX training), optionally time-shifted: ``σ' = sσ / (1 + (s-1)σ)``."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * u / (1.0 + (shift - 1.0) * u)


def noisy_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """``x_σ = (1-σ)·x0 + σ·ε`` and the velocity target ``ε - x0`` (scheduler.scale_noise's convention)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
    """MSE on the first ``num_target_tokens`` tokens only: reference tokens are conditioning, not output.

    ``pred (B, N, C)`` may span the whole sequence; ``target`` needs at least the target tokens. fp32.
    """
    n = num_target_tokens
    if pred.shape[1] < n or target.shape[1] < n:
        raise ValueError(f"need ≥ {n} tokens, got pred {tuple(pred.shape)}, target {tuple(target.shape)}")
    return torch.mean((pred[:, :n].float() - target[:, :n].float()) ** 2)


# -------------------------------------------------------------------------------------------- sampling


def inference_sigmas(pipe, num_steps: int, image_seq_len: int, device=None) -> torch.Tensor:
    """The σ grid ``(num_steps + 1,)`` ending in 0 that `Flux2KleinPipeline.__call__` steps through.

    Uses a fresh scheduler of the pipeline's config, so the shared one is never mutated.
    """
    sched = FlowGRPOScheduler.from_config(pipe.scheduler.config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    mu = da.compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    da.retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, mu=mu)
    return sched.sigmas.float()


def initial_noise(pipe, batch: int, height: int, width: int, generator: torch.Generator | None):
    """Gaussian noise drawn as the pipeline draws it: ``(B, 4C, h, w)`` (pass it as ``latents=`` to compare)."""
    c = pipe.transformer.config.in_channels // 4
    h = 2 * (height // (pipe.vae_scale_factor * 2))
    w = 2 * (width // (pipe.vae_scale_factor * 2))
    return torch.randn((batch, c * 4, h // 2, w // 2), generator=generator).to(pipe.transformer.device)


def noise_tokens(pipe, batch: int, height: int, width: int, generator: torch.Generator | None):
    """Initial noise as tokens ``(B, h·w, 4C)`` (fp32) with their ids: `prepare_latents` with the noise drawn on the CPU."""
    return pack_target(pipe, initial_noise(pipe, batch, height, width, generator))


@dataclass
class SDEStepOutput:
    prev_sample: torch.Tensor  # x' (B, ...) fp32
    log_prob: torch.Tensor  # log p(x'|x) averaged over each sample's dims (B,)
    mean: torch.Tensor  # μ
    std: float


class FlowGRPOScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler scheduler whose step can be Flow-GRPO's reverse-time SDE.

    ``step(..., noise_level=0)`` is the parent's Euler step; with ``noise_level = a > 0`` it samples the SDE
    with the ODE's marginals and returns the step's Gaussian log-prob. Build it from a pipeline's own
    scheduler: ``FlowGRPOScheduler.from_config(pipe.scheduler.config)``.
    """

    @staticmethod
    def sde_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: float | torch.Tensor,
                 sigma_next: float | torch.Tensor, noise_level: float, *, sigma_max_safe: float,
                 generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None) -> SDEStepOutput:
        """One step from σ to σ', in fp32: ``g = a·sqrt(σ/(1-σ))`` (σ = 1 uses ``sigma_max_safe``, the next
        grid point, to avoid /0); ``μ = x + dt·[v + g²/(2σ)·(x + (1-σ)v)]``; ``x' = μ + g·sqrt(-dt)·z``.
        ``a = 0`` is the Euler ODE step (log-prob 0). ``prev_sample`` scores a stored sample instead of drawing one.
        """
        v, x = model_output.float(), sample.float()
        sigma, sigma_next = float(sigma), float(sigma_next)
        dt = sigma_next - sigma
        if noise_level == 0.0:
            mean = x + dt * v
            out = mean if prev_sample is None else prev_sample.float()
            return SDEStepOutput(out, torch.zeros(x.shape[0], device=x.device), mean, 0.0)
        s_safe = sigma if sigma < 1.0 else sigma_max_safe
        g = noise_level * math.sqrt(s_safe / (1.0 - s_safe))
        mean = x + dt * (v + (g * g) / (2.0 * sigma) * (x + (1.0 - sigma) * v))
        std = g * math.sqrt(-dt)
        if prev_sample is None:
            z = torch.randn(x.shape, generator=generator).to(x.device)
            prev_sample = mean + std * z
        prev_sample = prev_sample.float()
        logp = -((prev_sample.detach() - mean) ** 2) / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi)
        return SDEStepOutput(prev_sample, logp.mean(dim=tuple(range(1, logp.dim()))), mean, std)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, noise_level: float = 0.0,
             generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
             return_dict: bool = True, **_):
        """The scheduler's step at its current index (as diffusers' loop calls it), SDE when ``noise_level > 0``."""
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        out = self.sde_step(model_output, sample, self.sigmas[i], self.sigmas[i + 1], noise_level,
                            sigma_max_safe=float(self.sigmas[1]), generator=generator, prev_sample=prev_sample)
        self._step_index += 1
        return out if return_dict else (out.prev_sample,)


def sde_step(v, x, sigma, sigma_next, noise_level, *, sigma_max_safe, generator=None, prev_sample=None):
    """``FlowGRPOScheduler.sde_step`` as a tuple ``(x', log-prob (B,), μ, std)``."""
    o = FlowGRPOScheduler.sde_step(v, x, sigma, sigma_next, noise_level, sigma_max_safe=sigma_max_safe,
                                   generator=generator, prev_sample=prev_sample)
    return o.prev_sample, o.log_prob, o.mean, o.std


def decode_tokens(pipe, tokens: torch.Tensor, ids: torch.Tensor, height: int, width: int, *, output_type="pil"):
    """Target tokens -> images, exactly the tail of `Flux2KleinPipeline.__call__` (unpack, de-normalise, decode)."""
    lh = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    lw = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    lat = da.unpack_tokens(pipe, tokens, ids, lh // 2, lw // 2)  # (B, N, C) -> (B, 4C, h, w)
    mean, std = _bn_mean_std(pipe.vae, lat)
    lat = da.unpatchify(pipe, lat * std + mean)  # (B, 4C, h, w) -> (B, C, 2h, 2w)
    image = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def sample_flow(
    transformer,
    x: torch.Tensor,
    x_ids: torch.Tensor,
    cond: Condition,
    sigmas: torch.Tensor,
    *,
    uncond: Condition | None = None,
    guidance_scale: float = 1.0,
    noise_level: float = 0.0,
    sde_steps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate from ``x`` (σ = sigmas[0]) down the grid; SDE at ``sde_steps`` (all if None), Euler elsewhere.

    Returns the visited states ``(B, T+1, N, C)`` and per-step log-probs ``(B, T)`` (0 on ODE steps).
    With ``noise_level = 0`` this is the scheduler's Euler loop, i.e. the pipeline's sampler.
    """
    x = x.float().contiguous()  # the trainer re-scores contiguous copies; equal layouts give equal bits
    xs, logps = [x], []
    for j in range(len(sigmas) - 1):
        s = float(sigmas[j])
        sig = torch.full((x.shape[0],), s, device=x.device)
        v = guided_velocity(transformer, x, x_ids, sig, cond, uncond, guidance_scale)
        a = noise_level if sde_steps is None or j in sde_steps else 0.0
        x, logp, _, _ = sde_step(v, x, s, float(sigmas[j + 1]), a, sigma_max_safe=float(sigmas[1]), generator=generator)
        xs.append(x)
        logps.append(logp)
    return torch.stack(xs, 1), torch.stack(logps, 1)
