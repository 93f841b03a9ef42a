"""PPRL: proxy-prompt reinforcement learning of FLUX.2 [klein] with Flow-GRPO.

The policy is trained on the loop's own executor calls (:class:`~clvr_agent.training.pprl_data.LoopState`:
accumulated prompt + reference canvases, exactly as at inference). A teacher turns each such long history
into a *proxy prompt*, an explicit step target (``ProxyPrompt``: the scene the step should produce and
the canvas pixels it must keep), and the rewards judge the samples against that target, not against
the raw history. With ``plain_proxy`` as the teacher the target is the raw history: the "simple RL" row.

Per step: G images per context drawn with the SDE form of the sampler (per-step Gaussian log-probs),
``R = w·R_text + (1-w)·R_ref`` (R_text alone where R_ref does not apply), group-relative advantages, then
``ppo_epochs`` optimizer steps on the clipped-ratio objective + ``kl_coef``·KL to the reference model
(the adapter-disabled model with LoRA, else a frozen copy of the starting transformer). Every
``eval_every`` steps the mean reward on fixed held-out contexts (fixed noise, ODE sampling) is logged.
Maths in fp32; see ``flow_matching.sde_step``.

Reward callables share one signature::

    reward(images: list[PIL.Image], proxies: list[ProxyPrompt]) -> list[float | None]

one score per image; ``None`` means the reward does not apply to that image (R_ref for a step with no
canvas to preserve), and the other term then carries the whole weight. The teacher is
``proxy_prompter(context) -> ProxyPrompt``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clvr_agent.seeds import derive_seed
from clvr_agent.training import checkpointing as ck
from clvr_agent.training import diffusion_loop as dl
from clvr_agent.training import flow_matching as fm
from clvr_agent.training.diffusion_configs import PPRLConfig
from clvr_agent.training.pprl_data import LoopState, ProxyPrompt, plain_proxy, policy_input
from clvr_agent.tools.flux2_klein import Flux2KleinExecutor, prompt_max_length

RewardFn = Callable[[list[Image.Image], list[ProxyPrompt]], list[Optional[float]]]
PRESERVE_TOL = 0.2  # a preserved pixel that moved by this much (mean over RGB, in [0, 1]) counts as lost
HELDOUT_FILE = "heldout.json"

__all__ = ["LoopState", "PPRLConfig", "PPRLTrainer", "ProxyPrompt", "plain_proxy", "preservation_reward"]


@dataclass
class Rollout:
    """One group: G samples of one context, everything the policy update needs."""

    cond: fm.Condition  # (G, ...)
    uncond: fm.Condition | None
    x_ids: torch.Tensor  # (G, N, 4)
    states: torch.Tensor  # (G, T+1, N, C) fp32
    log_probs: torch.Tensor  # (G, T)
    rewards: torch.Tensor  # (G,)
    advantages: torch.Tensor | None = None  # (G,)
    images: list[Image.Image] = field(default_factory=list)
    prompt: str = ""
    parts: dict = field(default_factory=dict)  # "text" / "ref": the group's mean of each term that applied


class PPRLTrainer:
    """``PPRLTrainer(pipeline, config, contexts, reward_text, reward_ref, proxy_prompter, heldout).train()``.

    ``contexts``: prompt strings or :class:`LoopState` s. ``reward_ref`` may be None when ``text_weight == 1``.
    ``heldout``: contexts never trained on, scored every ``eval_every`` steps with ``eval_prompter``'s
    targets (default: the training teacher's; pass the same teacher to compare runs with different ones).
    """

    def __init__(self, pipeline, config: PPRLConfig, prompts: Sequence[Any], reward_text: RewardFn,
                 reward_ref: RewardFn | None = None, proxy_prompter: Callable[[Any], ProxyPrompt] = plain_proxy,
                 heldout: Sequence[Any] = (), eval_prompter: Callable[[Any], ProxyPrompt] | None = None):
        if not prompts:
            raise ValueError("PPRL needs at least one prompt / loop state")
        if reward_ref is None and config.text_weight < 1.0:
            raise ValueError("no reward_ref given: pass one (e.g. preservation_reward) or set text_weight 1.0")
        if config.eval_every and not heldout:
            raise ValueError(f"eval_every {config.eval_every} needs held-out contexts: pass heldout= (CLI: --heldout-runs N) or set eval_every 0")
        if heldout and not config.eval_every:
            raise ValueError("held-out contexts were given but eval_every is 0: set eval_every (e.g. 5) to score them")
        self.pipe, self.cfg, self.prompts, self.heldout = pipeline, config, list(prompts), list(heldout)
        self.reward_text, self.reward_ref, self.proxy_prompter = reward_text, reward_ref, proxy_prompter
        self.eval_prompter = eval_prompter or proxy_prompter
        self.ref_model = None
        if config.kl_coef > 0 and not config.lora_rank:  # the KL reference of a full fine-tune: the starting weights
            self.ref_model = copy.deepcopy(pipeline.transformer).requires_grad_(False).eval()
        dl.setup(self, pipeline, config, schedule=config.lr_scheduler, warmup_steps=config.warmup_steps)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)
        self.policy = self.run["transformer"]
        self.seq_len = config.max_sequence_length or prompt_max_length(pipeline)
        self._fitter = Flux2KleinExecutor.from_pipeline(pipeline)  # fits accumulated prompts as inference does
        self._fitter.max_sequence_length = self.seq_len
        self._proxies: dict[tuple[str, int], ProxyPrompt] = {}
        self._conds: dict[tuple[str, int], tuple] = {}
        self.history: list[dict] = []
        self.heldout_curve: list[dict] = []

    # -- contexts -----------------------------------------------------------------------------------

    def proxy(self, i: int, split: str = "train") -> ProxyPrompt:
        """The teacher's target for context ``i`` (asked once per context)."""
        if (split, i) not in self._proxies:
            context = self.prompts[i] if split == "train" else self.heldout[i]
            self._proxies[(split, i)] = (self.proxy_prompter if split == "train" else self.eval_prompter)(context)
        return self._proxies[(split, i)]

    @torch.no_grad()
    def condition(self, i: int, split: str = "train") -> tuple[fm.Condition, fm.Condition | None]:
        """What the policy sees for context ``i``, batch 1: the executor's prompt and references (cached;
        the text encoder and VAE are frozen here)."""
        if (split, i) not in self._conds:
            cfg, pipe = self.cfg, self.pipe
            text, canvases = policy_input(self.prompts[i] if split == "train" else self.heldout[i])
            text = self._fitter.fit_prompt(text)  # the newest instruction survives the token limit
            refs = fm.to_pixels(pipe, canvases, cfg.height, cfg.width).unsqueeze(0) if canvases else None  # (1, K, 3, H, W)
            cond = fm.make_condition(pipe, *fm.encode_text(pipe, [text], max_sequence_length=self.seq_len), refs)
            uncond = None
            if cfg.guidance_scale > 1:
                uncond = fm.make_condition(pipe, *fm.encode_text(pipe, [""], max_sequence_length=self.seq_len), refs)
            self._conds[(split, i)] = (cond, uncond)
        return self._conds[(split, i)]

    # -- sampling and scoring -----------------------------------------------------------------------

    def score(self, images: list[Image.Image], proxy: ProxyPrompt) -> tuple[torch.Tensor, dict]:
        """``w·R_text + (1-w)·R_ref`` per image (R_text alone where R_ref returns None), and each term's mean."""
        w, n = self.cfg.text_weight, len(images)
        proxies = [proxy] * n
        text = self.reward_text(images, proxies)
        if len(text) != n or any(t is None for t in text):
            raise ValueError(f"reward_text must return a score for each of the {n} images, got {text!r}")
        r, parts = torch.tensor(text, dtype=torch.float32), {"text": float(np.mean(text))}
        if w < 1.0:
            ref = self.reward_ref(images, proxies)
            if len(ref) != n:
                raise ValueError(f"reward_ref returned {len(ref)} scores for {n} images")
            if any(f is not None for f in ref):
                if any(f is None for f in ref):
                    raise ValueError("reward_ref must apply to all images of one target or none (None for all)")
                r = w * r + (1 - w) * torch.tensor(ref, dtype=torch.float32)
                parts["ref"] = float(np.mean(ref))
        return r, parts

    @torch.no_grad()
    def rollout(self, index: int) -> Rollout:
        """Sample one group for context ``index`` with the current policy and score it against its proxy."""
        cfg, pipe = self.cfg, self.pipe
        proxy = self.proxy(index)
        cond, uncond = self.condition(index)
        g = cfg.group_size
        cond, uncond = cond.repeat_interleave(g), (uncond.repeat_interleave(g) if uncond is not None else None)
        x, x_ids = fm.noise_tokens(pipe, g, cfg.height, cfg.width, self.generator)  # (G, N, 4C)
        sigmas = fm.inference_sigmas(pipe, cfg.num_steps, x.shape[1])
        states, logps = fm.sample_flow(self.policy, x, x_ids, cond, sigmas, uncond=uncond,
                                       guidance_scale=cfg.guidance_scale, noise_level=cfg.noise_level,
                                       sde_steps=range(cfg.num_steps - 1), generator=self.generator)
        images = fm.decode_tokens(pipe, states[:, -1], x_ids, cfg.height, cfg.width, output_type="pil")
        r, parts = self.score(images, proxy)
        return Rollout(cond, uncond, x_ids, states, logps, r, images=images, prompt=proxy.text, parts=parts)

    def advantages(self, rollouts: list[Rollout]) -> None:
        """Group-relative: ``(r - mean_group) / (std + 1e-4)``, std per group or over the step; clamped."""
        all_r = torch.cat([ro.rewards for ro in rollouts])
        for ro in rollouts:
            std = all_r.std() if self.cfg.global_std else ro.rewards.std()
            a = (ro.rewards - ro.rewards.mean()) / (std + 1e-4)
            ro.advantages = a.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward on the held-out contexts: ``eval_group_size`` ODE samples each from fixed noise."""
        cfg, pipe = self.cfg, self.pipe
        self.policy.eval()
        rewards, parts = [], {"text": [], "ref": []}
        for i in range(len(self.heldout)):
            cond, uncond = self.condition(i, "heldout")
            n = cfg.eval_group_size
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 7_000_003, i))  # the same noise every time
            x, x_ids = fm.noise_tokens(pipe, n, cfg.height, cfg.width, gen)
            sigmas = fm.inference_sigmas(pipe, cfg.num_steps, x.shape[1])
            states, _ = fm.sample_flow(self.policy, x, x_ids, cond.repeat_interleave(n), sigmas,
                                       uncond=uncond.repeat_interleave(n) if uncond is not None else None,
                                       guidance_scale=cfg.guidance_scale, noise_level=0.0)
            images = fm.decode_tokens(pipe, states[:, -1], x_ids, cfg.height, cfg.width, output_type="pil")
            r, p = self.score(images, self.proxy(i, "heldout"))
            rewards.append(r.mean().item())
            for k, v in p.items():
                parts[k].append(v)
        rec = {"step": self.step, "heldout_reward": float(np.mean(rewards)), "heldout_text": float(np.mean(parts["text"]))}
        if parts["ref"]:
            rec["heldout_ref"] = float(np.mean(parts["ref"]))
        self.heldout_curve.append(rec)
        if self.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / HELDOUT_FILE).write_text(json.dumps(self.heldout_curve, indent=1))
        return rec

    # -- policy update ------------------------------------------------------------------------------

    def reference_velocity(self, x, x_ids, sig, ro: Rollout) -> torch.Tensor:
        """The KL reference's guided velocity: the adapter-disabled policy, or the frozen starting copy."""
        cfg = self.cfg
        if self.ref_model is not None:
            return fm.guided_velocity(self.ref_model, x, ro.x_ids, sig, ro.cond, ro.uncond, cfg.guidance_scale)
        plain = self.accelerator.unwrap_model(self.policy)  # adapters switch on the module, not its wrapper
        plain.disable_adapters()
        try:
            return fm.guided_velocity(self.policy, x, ro.x_ids, sig, ro.cond, ro.uncond, cfg.guidance_scale)
        finally:
            plain.enable_adapters()

    def policy_loss(self, ro: Rollout, *, backward: bool = True, scale: float = 1.0) -> dict:
        """Clipped-ratio loss (+ KL) over the trained steps of one group; backward per step (memory ∝ one step)."""
        cfg = self.cfg
        sigmas = fm.inference_sigmas(self.pipe, cfg.num_steps, ro.states.shape[2])
        steps = cfg.train_steps
        ratios, losses, kls, clipped = [], [], [], []
        adv = ro.advantages.to(ro.states.device)
        for j in steps:
            x, s, s_next = ro.states[:, j].contiguous(), float(sigmas[j]), float(sigmas[j + 1])
            sig = torch.full((x.shape[0],), s, device=x.device)
            with self.accelerator.autocast():
                v = fm.guided_velocity(self.policy, x, ro.x_ids, sig, ro.cond, ro.uncond, cfg.guidance_scale)
            _, logp, mean, std = fm.sde_step(v, x, s, s_next, cfg.noise_level, sigma_max_safe=float(sigmas[1]),
                                             prev_sample=ro.states[:, j + 1])
            ratio = torch.exp(logp - ro.log_probs[:, j])
            low, high = 1 - cfg.clip_range, 1 + cfg.clip_range
            loss = torch.mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high)))
            # where the clipped term wins, the sample gives no gradient (trl's is_clipped)
            clipped.append(((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low)))
            if cfg.kl_coef > 0:
                with torch.no_grad():
                    v_ref = self.reference_velocity(x, ro.x_ids, sig, ro)
                    _, _, mean_ref, _ = fm.sde_step(v_ref, x, s, s_next, cfg.noise_level,
                                                   sigma_max_safe=float(sigmas[1]), prev_sample=ro.states[:, j + 1])
                # Gaussian KL between the two step distributions (same std), averaged over dims like the log-prob.
                kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2)) / (2 * std * std)
                loss = loss + cfg.kl_coef * kl.mean()
                kls.append(kl.mean().item())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite PPRL loss at step {self.step}: lower learning_rate or noise_level")
            if backward:
                self.accelerator.backward(loss * scale / len(steps))
            ratios.append(ratio.detach())
            losses.append(loss.item())
        out = {"ratios": torch.stack(ratios, 1), "loss": sum(losses) / len(losses),
               "clip_frac": torch.stack(clipped, 1).float().mean().item()}
        if kls:
            out["kl"] = sum(kls) / len(kls)
        return out

    def update(self) -> float | None:
        """One optimizer step on the accumulated gradients (the LR schedule steps once per rollout batch)."""
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step_indices(self, step: int) -> list[int]:
        """Context indices for ``step`` (a function of the step, so resume replays nothing)."""
        n, k = len(self.prompts), self.cfg.groups_per_step
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        base = (step * world + rank) * k
        return [(self.cfg.seed + base + i) % n for i in range(k)]

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        if dl.resume(self):
            path = Path(cfg.output_dir) / HELDOUT_FILE
            if path.is_file():
                self.heldout_curve = [r for r in json.loads(path.read_text()) if r["step"] <= self.step]
        elif cfg.eval_every:
            self.evaluate()  # the curve starts at the model before any update
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="pprl",
                   disable=not acc.is_local_main_process)
        for step in bar:
            self.policy.eval()  # sampling and training run the same code path: the first epoch's ratio is exactly 1
            rollouts = [self.rollout(i) for i in self.step_indices(step)]
            self.advantages(rollouts)
            lr = self.lr_scheduler.get_last_lr()[0]
            epochs = []
            for _ in range(cfg.ppo_epochs):
                stats = [self.policy_loss(ro, scale=1.0 / len(rollouts)) for ro in rollouts]
                epochs.append((stats, self.update()))
            ck.step_schedule(self.optimizer, self.lr_scheduler)
            self.step = step + 1
            rec = self._record(rollouts, epochs, lr)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                rec.update({k: v for k, v in self.evaluate().items() if k != "step"})
            dl.log_step(self, rec)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}")
            dl.maybe_checkpoint(self)
        dl.finish(self, {"stage": "pprl", **asdict(cfg)})
        return self.history

    def _record(self, rollouts: list[Rollout], epochs: list, lr: float) -> dict:
        rewards = torch.cat([ro.rewards for ro in rollouts])
        stats = [s for ss, _ in epochs for s in ss]
        ratios = torch.cat([s["ratios"].flatten() for s in stats])
        last = torch.cat([s["ratios"].flatten() for s in epochs[-1][0]])
        rec = {"step": self.step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
               "reward_text": float(np.mean([ro.parts["text"] for ro in rollouts])),
               "loss": sum(s["loss"] for s in stats) / len(stats), "ratio_mean": ratios.mean().item(),
               "ratio_dev_last": (last - 1).abs().max().item(),  # the last epoch's largest |ratio - 1|
               "clip_frac": sum(s["clip_frac"] for s in stats) / len(stats),
               "zero_std_groups": sum(int(ro.rewards.std() < 1e-8) for ro in rollouts), "lr": lr}
        refs = [ro.parts["ref"] for ro in rollouts if "ref" in ro.parts]
        if refs:
            rec["reward_ref"] = float(np.mean(refs))
        norms = [g for _, g in epochs if g is not None]
        if norms:
            rec["grad_norm"] = norms[-1]
        if "kl" in stats[0]:
            rec["kl"] = sum(s["kl"] for s in stats) / len(stats)
        return rec

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step)


def preservation_reward(images: list[Image.Image], proxies: list[ProxyPrompt]) -> list[Optional[float]]:
    """R_ref: how much of what the step must keep it kept, in [0, 1]; None without a canvas to keep.

    Over the proxy's ``preserve`` pixels of its last reference (all of them when None; resized to the
    sample, a sample pixel counts only if it lies wholly inside), ``1 - mean(min(1, d / PRESERVE_TOL))``
    with ``d`` the mean absolute RGB difference in [0, 1]: re-rendering noise costs little, a changed
    object costs fully, and whatever the step does inside the edited region costs nothing.
    """
    out: list[Optional[float]] = []
    for im, proxy in zip(images, proxies):
        if not proxy.references:
            out.append(None)
            continue
        ref = proxy.references[-1]
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        b = np.asarray(ref.convert("RGB").resize(im.size, Image.Resampling.BOX), dtype=np.float32) / 255
        keep = np.ones(a.shape[:2], bool)
        if proxy.preserve is not None:
            frac = Image.fromarray(proxy.preserve.astype(np.float32)).resize(im.size, Image.Resampling.BOX)
            keep = np.asarray(frac) > 0.999
        if not keep.any():
            out.append(None)
            continue
        d = np.abs(a - b).mean(-1)[keep]
        out.append(float(1.0 - np.minimum(1.0, d / PRESERVE_TOL).mean()))
    return out
