"""PPRL: proxy-prompt reinforcement learning of FLUX.2 [klein] with Flow-GRPO.

A teacher (any callable) turns each long interleaved history into a *proxy prompt*: an explicit text
target plus reference images. The policy draws a group of G images per proxy prompt with the SDE form of
the sampler (per-step Gaussian log-probs), a reward ``w·R_text + (1-w)·R_ref`` scores them, advantages
are group-relative, and a clipped-ratio objective (optionally + KL to the adapter-disabled model) updates
the transformer's LoRA. Maths in fp32; see ``flow_matching.sde_step``.

Reward callables share one signature::

    reward(images: list[PIL.Image], prompts: list[str], refs: list[list[PIL.Image]]) -> list[float]

and the teacher is ``proxy_prompter(context) -> ProxyPrompt`` (``context`` is whatever ``prompts`` holds:
a prompt string, a trajectory record, ...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from clvr_agent.training import diffusion_loop as dl
from clvr_agent.training.diffusion_configs import PPRLConfig
from clvr_agent.training import flow_matching as fm
from clvr_agent.tools.flux2_klein import prompt_max_length

RewardFn = Callable[[list[Image.Image], list[str], list[list[Image.Image]]], list[float]]


@dataclass
class ProxyPrompt:
    """The teacher's explicit target for one history: text plus reference images (may be empty)."""

    text: str
    references: list[Image.Image] = field(default_factory=list)


def plain_proxy(context: Any) -> ProxyPrompt:
    """The no-teacher proxy: a prompt string as is; a record's ``prompt`` with its ``references`` (PNG paths)."""
    if isinstance(context, str):
        return ProxyPrompt(context)
    if isinstance(context, dict) and "prompt" in context:
        refs = []
        for p in context.get("references", []):
            with Image.open(p) as im:
                refs.append(im.convert("RGB"))
        return ProxyPrompt(str(context["prompt"]), refs)
    raise TypeError(f"plain_proxy takes a prompt string or a {{'prompt', 'references'}} record, got {type(context).__name__}")


@dataclass
class Rollout:
    """One group: G samples of one proxy prompt, everything the policy update needs."""

    cond: fm.Condition  # (G, ...)
    uncond: fm.Condition | None
    x_ids: torch.Tensor  # (G, N, 4)
    states: torch.Tensor  # (G, T+1, N, C) fp32
    log_probs: torch.Tensor  # (G, T)
    rewards: torch.Tensor  # (G,)
    advantages: torch.Tensor | None = None  # (G,)
    images: list[Image.Image] = field(default_factory=list)
    prompt: str = ""


class PPRLTrainer:
    """``PPRLTrainer(pipeline, config, prompts, reward_text, reward_ref, proxy_prompter).train()``.

    ``reward_ref`` may be None when ``text_weight == 1``.
    """

    def __init__(self, pipeline, config: PPRLConfig, prompts: Sequence[Any], reward_text: RewardFn,
                 reward_ref: RewardFn | None = None, proxy_prompter: Callable[[Any], ProxyPrompt] = plain_proxy):
        if not prompts:
            raise ValueError("PPRL needs at least one prompt / history")
        if reward_ref is None and config.text_weight < 1.0:
            raise ValueError("no reward_ref given: pass one or set text_weight 1.0")
        self.pipe, self.cfg, self.prompts = pipeline, config, list(prompts)
        self.reward_text, self.reward_ref, self.proxy_prompter = reward_text, reward_ref, proxy_prompter
        dl.setup(self, pipeline, config, schedule=config.lr_scheduler, warmup_steps=config.warmup_steps)
        self.policy = self.run["transformer"]
        self._proxies: dict[int, ProxyPrompt] = {}
        self._conds: dict[int, tuple] = {}
        self.history: list[dict] = []

    # -- sampling -----------------------------------------------------------------------------------

    def proxy(self, i: int) -> ProxyPrompt:
        if i not in self._proxies:  # the teacher is asked once per history
            self._proxies[i] = self.proxy_prompter(self.prompts[i])
        return self._proxies[i]

    @torch.no_grad()
    def condition(self, proxy: ProxyPrompt) -> tuple[fm.Condition, fm.Condition | None]:
        cfg, pipe = self.cfg, self.pipe
        kw = dict(max_sequence_length=cfg.max_sequence_length or prompt_max_length(pipe))
        refs = None
        if proxy.references:
            refs = fm.to_pixels(pipe, proxy.references, cfg.height, cfg.width).unsqueeze(0)  # (1, K, 3, H, W)
        cond = fm.make_condition(pipe, *fm.encode_text(pipe, [proxy.text], **kw), refs)
        uncond = fm.make_condition(pipe, *fm.encode_text(pipe, [""], **kw), refs) if cfg.guidance_scale > 1 else None
        g = cfg.group_size
        return cond.repeat_interleave(g), (uncond.repeat_interleave(g) if uncond is not None else None)

    @torch.no_grad()
    def rollout(self, index: int) -> Rollout:
        """Sample one group for history ``index`` with the current policy and score it."""
        cfg, pipe = self.cfg, self.pipe
        proxy = self.proxy(index)
        if index not in self._conds:  # the text encoder and VAE are frozen here: encode each proxy once
            self._conds[index] = self.condition(proxy)
        cond, uncond = self._conds[index]
        x, x_ids = fm.noise_tokens(pipe, cfg.group_size, cfg.height, cfg.width, self.generator)  # (G, N, 4C)
        sigmas = fm.inference_sigmas(pipe, cfg.num_steps, x.shape[1])
        states, logps = fm.sample_flow(self.policy, x, x_ids, cond, sigmas, uncond=uncond,
                                       guidance_scale=cfg.guidance_scale, noise_level=cfg.noise_level,
                                       sde_steps=range(cfg.num_steps - 1), generator=self.generator)
        images = fm.decode_tokens(pipe, states[:, -1], x_ids, cfg.height, cfg.width, output_type="pil")
        prompts, refs = [proxy.text] * len(images), [list(proxy.references)] * len(images)
        r = torch.tensor(self.reward_text(images, prompts, refs), dtype=torch.float32)
        if cfg.text_weight < 1.0:
            r = cfg.text_weight * r + (1 - cfg.text_weight) * torch.tensor(self.reward_ref(images, prompts, refs), dtype=torch.float32)
        if r.shape != (len(images),):
            raise ValueError(f"a reward callable returned {tuple(r.shape)} scores for {len(images)} images")
        return Rollout(cond, uncond, x_ids, states, logps, r, images=images, prompt=proxy.text)

    def advantages(self, rollouts: list[Rollout]) -> None:
        """Group-relative: ``(r - mean_group) / (std + 1e-4)``, std per group or over the step; clamped."""
        all_r = torch.cat([ro.rewards for ro in rollouts])
        for ro in rollouts:
            std = all_r.std() if self.cfg.global_std else ro.rewards.std()
            a = (ro.rewards - ro.rewards.mean()) / (std + 1e-4)
            ro.advantages = a.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    # -- policy update ------------------------------------------------------------------------------

    def policy_loss(self, ro: Rollout, *, backward: bool = True, scale: float = 1.0) -> dict:
        """Clipped-ratio loss over the trained steps of one group; backward per step (memory ∝ one step)."""
        cfg = self.cfg
        sigmas = fm.inference_sigmas(self.pipe, cfg.num_steps, ro.states.shape[2])
        steps = cfg.train_steps
        ratios, losses, kls = [], [], []
        for j in steps:
            x, s, s_next = ro.states[:, j].contiguous(), float(sigmas[j]), float(sigmas[j + 1])
            sig = torch.full((x.shape[0],), s, device=x.device)
            with self.accelerator.autocast():
                v = fm.guided_velocity(self.policy, x, ro.x_ids, sig, ro.cond, ro.uncond, cfg.guidance_scale)
            _, logp, mean, std = fm.sde_step(v, x, s, s_next, cfg.noise_level, sigma_max_safe=float(sigmas[1]),
                                             prev_sample=ro.states[:, j + 1])
            ratio = torch.exp(logp - ro.log_probs[:, j])
            adv = ro.advantages.to(ratio.device)
            loss = torch.mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)))
            if cfg.beta > 0:
                with torch.no_grad():
                    plain = self.accelerator.unwrap_model(self.policy)  # adapters switch on the module, not its wrapper
                    plain.disable_adapters()
                    try:
                        v_ref = fm.guided_velocity(self.policy, x, ro.x_ids, sig, ro.cond, ro.uncond, cfg.guidance_scale)
                    finally:
                        plain.enable_adapters()
                    _, _, mean_ref, _ = fm.sde_step(v_ref, x, s, s_next, cfg.noise_level,
                                                   sigma_max_safe=float(sigmas[1]), prev_sample=ro.states[:, j + 1])
                # Gaussian KL between the two step distributions (same std), averaged over dims like the log-prob.
                kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2)) / (2 * std * std)
                loss = loss + cfg.beta * kl.mean()
                kls.append(kl.mean().item())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite PPRL loss at step {self.step}: lower learning_rate or noise_level")
            if backward:
                self.accelerator.backward(loss * scale / len(steps))
            ratios.append(ratio.detach())
            losses.append(loss.item())
        out = {"ratios": torch.stack(ratios, 1), "loss": sum(losses) / len(losses)}
        if kls:
            out["kl"] = sum(kls) / len(kls)
        return out

    def step_indices(self, step: int) -> list[int]:
        """History indices for ``step`` (a function of the step, so resume replays nothing)."""
        n, k = len(self.prompts), self.cfg.groups_per_step
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        base = (step * world + rank) * k
        return [(self.cfg.seed + base + i) % n for i in range(k)]

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        dl.resume(self)
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="pprl",
                   disable=not acc.is_local_main_process)
        for step in bar:
            self.policy.eval()  # sampling and training run the same code path: the on-policy ratio is exactly 1
            rollouts = [self.rollout(i) for i in self.step_indices(step)]
            self.advantages(rollouts)
            stats = [self.policy_loss(ro, scale=1.0 / len(rollouts)) for ro in rollouts]
            lr = self.lr_scheduler.get_last_lr()[0]
            grad_norm = dl.optimizer_step(self)
            self.step = step + 1
            rewards = torch.cat([ro.rewards for ro in rollouts])
            ratios = torch.cat([s["ratios"].flatten() for s in stats])
            rec = {"step": self.step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                   "loss": sum(s["loss"] for s in stats) / len(stats), "ratio_mean": ratios.mean().item(),
                   "zero_std_groups": sum(int(ro.rewards.std() < 1e-8) for ro in rollouts), "lr": lr}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if "kl" in stats[0]:
                rec["kl"] = sum(s["kl"] for s in stats) / len(stats)
            dl.log_step(self, rec)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}")
            dl.maybe_checkpoint(self)
        dl.finish(self, {"stage": "pprl", **asdict(cfg)})
        return self.history

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step)


def shapeworld_reward(images: list[Image.Image], prompts: list[str], refs: list[list[Image.Image]]) -> list[float]:
    """R_text for ShapeWorld prompts: GenEval's partial-credit clause score from the pixel detector."""
    from clvr_agent.eval.rules import partial_score
    from clvr_agent.tools.shapeworld.detect import detect
    from clvr_agent.tools.shapeworld.language import parse_prompt
    from clvr_agent.tools.shapeworld.world import CANVAS

    def canvas(im: Image.Image) -> Image.Image:
        # The detector is calibrated on ShapeWorld's canvas size; a small model's samples are upscaled to it.
        return im if im.size == (CANVAS, CANVAS) else im.convert("RGB").resize((CANVAS, CANVAS), Image.Resampling.LANCZOS)

    return [partial_score(parse_prompt(p), detect(canvas(im))) for im, p in zip(images, prompts)]


def pixel_similarity_reward(images: list[Image.Image], prompts: list[str], refs: list[list[Image.Image]]) -> list[float]:
    """R_ref without a learned embedding: ``1 - mean |image - last reference|`` in [0, 1]; 1 with no reference."""
    import numpy as np

    out = []
    for im, rs in zip(images, refs):
        if not rs:
            out.append(1.0)
            continue
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        b = np.asarray(rs[-1].convert("RGB").resize(im.size), dtype=np.float32) / 255
        out.append(float(1.0 - np.abs(a - b).mean()))
    return out
