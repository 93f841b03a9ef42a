"""Diffusion trajectory SFT: flow matching for FLUX.2 [klein] on (accumulated prompt, references, target).

Each example asks the model to draw the target canvas from the accumulated prompt with up to three earlier
canvases as reference tokens, exactly what the executor asks at each step of the loop. A prior-only example
(a prompt, no target) asks nothing new: its loss is the prior term alone, so the base's drawing of prompts
the data does not render (e.g. the loop's own multi-object prompts) is held in place. The transformer,
the text encoder and the VAE (reconstruction loss) can each be trained; the transformer fully or with LoRA.
Single process or ``accelerate launch`` (DDP) with no change.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from clvr_agent.training import diffusion_loop as dl
from clvr_agent.training.diffusion_configs import SFTDiffusionConfig
from clvr_agent.training import flow_matching as fm
from clvr_agent.tools.flux2_klein import prompt_max_length
from clvr_agent.seeds import derive_seed


@dataclass
class SFTExample:
    prompt: str
    references: list[str]
    target: Optional[str]  # None: a prior-only example (loss = prior_weight × MSE to the base's velocity)
    crop: Optional[tuple[int, int, int, int]] = None  # (x0, y0, x1, y1) of the target the example draws; None = all


class SFTDiffusionDataset:
    """Examples from a JSONL of ``{"prompt", "references": [png], "target": png}``, prior-only records
    ``{"prompt", "prior_only": true}`` (no references, no target) or trajectory records.

    A trajectory record (``clvr_agent.types.Trajectory``) yields one example per step that drew a canvas,
    executed (passive check) and was accepted: ``(request.accumulated_prompt, request.references, canvas)``.
    A region draw (``inpaint`` with a ``region_prompt``) is not an edit: the executor drew the region alone
    from ``region_prompt`` and pasted it, so it is trained as that text-to-image draw — ``region_prompt``,
    no references, the region cut from the canvas — never as "accumulated prompt + canvas → pasted canvas".
    Relative image paths resolve against the JSONL's folder.
    """

    def __init__(self, examples: Sequence[SFTExample]):
        if not examples:
            raise ValueError("the SFT dataset is empty: give at least one example")
        self.examples = list(examples)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "SFTDiffusionDataset":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"dataset not found: {path}")
        examples: list[SFTExample] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    examples.extend(cls._examples_from_record(json.loads(line), path.parent))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{n}: not an SFT record or trajectory ({exc})") from None
        return cls(examples)

    @staticmethod
    def _examples_from_record(rec: dict, root: Path) -> list[SFTExample]:
        res = lambda p: str(p if Path(p).is_absolute() else root / p)  # noqa: E731
        if "steps" in rec:
            from clvr_agent.types import Trajectory

            traj = Trajectory.model_validate(rec)
            kept = [s for s in traj.steps
                    if s.canvas is not None and s.accepted and s.error is None and (s.passive is None or s.passive.executed)]
            return [SFTDiffusionDataset._step_example(s, res) for s in kept]
        if rec.get("prior_only"):
            if rec.get("references") or rec.get("target"):
                raise ValueError("a prior_only record is a prompt alone: drop its references and target")
            return [SFTExample(str(rec["prompt"]), [], None)]
        return [SFTExample(str(rec["prompt"]), [res(p) for p in rec.get("references", [])], res(rec["target"]))]

    @staticmethod
    def _step_example(step, res) -> SFTExample:
        r = step.request
        if r.mode == "inpaint" and r.region_prompt:
            box = r.region
            return SFTExample(r.region_prompt, [], res(step.canvas.path), crop=(box.x0, box.y0, box.x1, box.y1))
        return SFTExample(r.accumulated_prompt, [res(ref.path) for ref in r.references], res(step.canvas.path))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


class SFTDiffusionTrainer:
    """``SFTDiffusionTrainer(pipeline, config, dataset).train()`` -> list of logged metrics."""

    def __init__(self, pipeline, config: SFTDiffusionConfig, dataset: SFTDiffusionDataset):
        self.pipe, self.cfg, self.dataset = pipeline, config, dataset
        # The text encoder's layers above its last stacked output get no gradient: DDP must be told.
        dl.setup(self, pipeline, config, transformer=config.train_transformer, text_encoder=config.train_text_encoder,
                 vae=config.train_vae, find_unused_parameters=config.train_text_encoder, schedule=config.lr_scheduler,
                 warmup_steps=config.warmup_steps, betas=(config.adam_beta1, config.adam_beta2))
        self.history: list[dict] = []
        self._perms: dict[int, list[int]] = {}
        if config.prior_weight == 0 and any(e.target is None for e in dataset.examples):
            raise ValueError("the data holds prior_only records, whose only loss is the prior term: set prior_weight > 0")
        # Prior preservation's reference: a LoRA's base is the adapter switched off; a full fine-tune keeps
        # a frozen copy of the transformer as loaded (before any step, so also the base on resume).
        self.base_transformer = None
        if config.prior_weight > 0 and not config.lora_rank:
            self.base_transformer = copy.deepcopy(pipeline.transformer).requires_grad_(False).eval()

    # -- data ---------------------------------------------------------------------------------------

    def _open(self, path: str, crop: Optional[tuple[int, int, int, int]] = None) -> Image.Image:
        with Image.open(path) as im:
            im = im.convert("RGB")
        return im.crop(crop) if crop is not None else im

    def batch_keys(self, step: int) -> list[int]:
        """Global positions of this process's examples at optimizer step ``step`` (rank ``r`` takes every N-th).

        An example's position picks it from the epoch's shuffle and seeds its noise, σ and prompt dropout,
        so a step trains on the same draws whatever the number of processes, and resume is exact.
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.cfg.batch_size * world
        return list(range(step * per_step, (step + 1) * per_step))[rank::world]

    def batch_indices(self, step: int) -> list[int]:
        """Examples of optimizer step ``step`` on this process: a function of the step, so resume is exact."""
        return [self.example_at(k) for k in self.batch_keys(step)]

    def example_at(self, key: int) -> int:
        epoch, pos = divmod(key, len(self.dataset))
        if epoch not in self._perms:
            perm = list(range(len(self.dataset)))
            random.Random(derive_seed(self.cfg.seed, epoch)).shuffle(perm)
            self._perms = {epoch: perm}
        return self._perms[epoch][pos]

    def _draw_generator(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, key, 1))

    @torch.no_grad()
    def set_bn_stats_from_data(self) -> None:
        drawn = [e for e in self.dataset.examples if e.target is not None][: self.cfg.bn_stats_samples]
        batches = (
            fm.to_pixels(self.pipe, [self._open(e.target, e.crop) for e in drawn[s : s + 16]], self.cfg.height, self.cfg.width)
            for s in range(0, len(drawn), 16)
        )
        fm.set_latent_bn_stats(self.pipe.vae, *fm.latent_bn_stats(self.pipe, batches))

    # -- loss ---------------------------------------------------------------------------------------

    def loss(self, examples: Sequence[SFTExample], keys: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Flow-matching loss on the target tokens (+ VAE reconstruction); micro-batches grouped by #references.

        ``keys`` (one per example, see ``batch_keys``) seed each example's dropout, σ and noise.
        """
        cfg, pipe = self.cfg, self.pipe
        gens = [self._draw_generator(k) for k in keys]
        drop = [float(torch.rand((), generator=g)) < cfg.cfg_dropout for g in gens]
        prompts = ["" if d else e.prompt for e, d in zip(examples, drop)]
        total, logs, raws = 0.0, {}, []
        groups: dict[int, list[int]] = {}
        prior_only = [i for i, e in enumerate(examples) if e.target is None]
        if prior_only:
            prior = self.prior_only_loss([prompts[i] for i in prior_only], [gens[i] for i in prior_only])
            total = total + cfg.prior_weight * prior * len(prior_only) / len(examples)
            logs["prior_only"] = prior.item()
        for i, e in enumerate(examples):
            if e.target is None:
                continue
            groups.setdefault(min(len(e.references), cfg.max_references), []).append(i)
        for k, idx in sorted(groups.items()):
            targets = fm.to_pixels(pipe, [self._open(examples[i].target, examples[i].crop) for i in idx], cfg.height, cfg.width)
            with torch.no_grad():  # targets are data: the VAE learns only from its reconstruction loss
                raw = fm.raw_latents(pipe, targets)
                raws.append(raw)
                x0 = fm.normalize_latents(pipe, raw)
                ref_tokens = ref_ids = None
                if k:
                    paths = [p for i in idx for p in examples[i].references[-k:]]
                    ref_px = fm.to_pixels(pipe, [self._open(p) for p in paths], cfg.height, cfg.width)
                    ref_tokens, ref_ids = fm.pack_references(pipe, ref_px.unflatten(0, (len(idx), k)))  # (B, K, 3, H, W) -> (B, K·h·w, 4C)
            embeds, text_ids = fm.encode_text(
                pipe, [prompts[i] for i in idx], text_encoder=self.run.get("text_encoder"),
                max_sequence_length=cfg.max_sequence_length or prompt_max_length(pipe),
            )
            cond = fm.Condition(embeds, text_ids, None if ref_tokens is None else ref_tokens.to(embeds.dtype), ref_ids)
            x0_tok, x_ids = fm.pack_target(pipe, x0)  # (B, 4C, h, w) -> (B, h·w, 4C)
            sigma = torch.cat([fm.sample_sigmas(1, mean=cfg.logit_mean, std=cfg.logit_std, shift=cfg.timestep_shift,
                                                generator=gens[i]) for i in idx]).to(x0.device)
            noise = torch.cat([torch.randn((1, *x0_tok.shape[1:]), generator=gens[i]) for i in idx]).to(x0_tok)
            x_t, target = fm.noisy_target(x0_tok, noise, sigma)
            transformer = self.run.get("transformer", pipe.transformer)
            with self.accelerator.autocast():
                pred = fm.transformer_forward(transformer, x_t, x_ids, sigma, cond)
            fm_loss = fm.flow_matching_loss(pred, target, x0_tok.shape[1])
            total = total + fm_loss * len(idx) / len(examples)
            logs[f"loss_refs{k}"] = fm_loss.item()
            if k == 0 and cfg.prior_weight > 0:  # text-to-image examples: stay where the base's velocity is
                prior = fm.flow_matching_loss(pred, self.base_velocity(x_t, x_ids, sigma, cond), x0_tok.shape[1])
                total = total + cfg.prior_weight * prior * len(idx) / len(examples)
                logs["prior"] = prior.item()
            if cfg.train_vae:
                recon = self.run["vae"](targets).sample
                rec = torch.mean((recon.float() - targets.float()) ** 2)
                total = total + cfg.vae_loss_weight * rec * len(idx) / len(examples)
                logs["vae_recon"] = rec.item()
        if cfg.train_vae and self.pipe.vae.training:  # not while evaluating
            self._update_bn(torch.cat(raws))
        return total, logs

    def prior_only_loss(self, prompts: Sequence[str], gens: Sequence[torch.Generator]) -> torch.Tensor:
        """MSE to the base's velocity on prompts without a target, at the base's own draws of them, noised.

        The base draws each prompt (``prior_sample_steps`` Euler steps from the example's noise, no CFG),
        so the prior is regressed on canvases of the distribution the model samples, not on the data's.
        """
        cfg, pipe = self.cfg, self.pipe
        embeds, text_ids = fm.encode_text(pipe, list(prompts), max_sequence_length=cfg.max_sequence_length or prompt_max_length(pipe))
        cond = fm.Condition(embeds, text_ids)
        start = [fm.noise_tokens(pipe, 1, cfg.height, cfg.width, g) for g in gens]
        x1, x_ids = torch.cat([t for t, _ in start]), start[0][1].expand(len(gens), -1, -1)  # (B, h·w, 4C)
        with torch.no_grad(), self._base() as base:
            states, _ = fm.sample_flow(base, x1, x_ids, cond, fm.inference_sigmas(pipe, cfg.prior_sample_steps, x1.shape[1]))
        x0 = states[:, -1]
        sigma = torch.cat([fm.sample_sigmas(1, mean=cfg.logit_mean, std=cfg.logit_std, shift=cfg.timestep_shift,
                                            generator=g) for g in gens]).to(x0.device)
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens]).to(x0)
        x_t, _ = fm.noisy_target(x0, noise, sigma)
        with self.accelerator.autocast():
            pred = fm.transformer_forward(self.run.get("transformer", pipe.transformer), x_t, x_ids, sigma, cond)
        return fm.flow_matching_loss(pred, self.base_velocity(x_t, x_ids, sigma, cond), x0.shape[1])

    @contextlib.contextmanager
    def _base(self):
        """The frozen base transformer: the copy of a full fine-tune, or the LoRA's transformer with its adapter off."""
        if self.base_transformer is not None:
            yield self.base_transformer
            return
        transformer = self.run["transformer"]
        plain = self.accelerator.unwrap_model(transformer)  # adapters switch on the module, not its wrapper
        plain.disable_adapters()
        try:
            yield transformer
        finally:
            plain.enable_adapters()

    @torch.no_grad()
    def base_velocity(self, x_t: torch.Tensor, x_ids: torch.Tensor, sigma: torch.Tensor, cond: fm.Condition) -> torch.Tensor:
        """The frozen base transformer's velocity on the target tokens, ``(B, N_t, C)``."""
        with self.accelerator.autocast(), self._base() as base:
            return fm.velocity(base, x_t, x_ids, sigma, cond)

    @torch.no_grad()
    def _update_bn(self, raw: torch.Tensor) -> None:
        """EMA of the latent BN statistics over this micro-batch on every process (equal sizes, so the mean
        of the processes' moments is the global one); every process makes the same update."""
        bn, m = self.pipe.vae.bn, self.cfg.bn_momentum
        x = raw.float().transpose(0, 1).flatten(1)  # (B, 4C, h, w) -> (4C, B·h·w)
        moments = self.accelerator.reduce(torch.stack([x.mean(1), (x * x).mean(1)]), "mean")
        mean, var = moments[0], (moments[1] - moments[0] ** 2).clamp_min(0.0)
        bn.running_mean.mul_(1 - m).add_(m * mean.to(bn.running_mean))
        bn.running_var.mul_(1 - m).add_(m * var.to(bn.running_var))

    # -- loop ---------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        if not dl.resume(self) and cfg.set_bn_stats:
            self.set_bn_stats_from_data()
        micro = cfg.batch_size // cfg.gradient_accumulation_steps
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="sft-diffusion",
                   disable=not acc.is_local_main_process)
        for step in bar:
            keys = self.batch_keys(step)
            examples = [self.dataset[self.example_at(k)] for k in keys]
            step_loss, logs = 0.0, {}
            for s in range(0, len(examples), micro):
                with contextlib.ExitStack() as local:
                    if s + micro < len(examples):  # gradients are all-reduced once, after the last micro-batch
                        for module in self.run.values():
                            local.enter_context(acc.no_sync(module))
                    loss, logs = self.loss(examples[s : s + micro], keys[s : s + micro])
                    loss = loss / cfg.gradient_accumulation_steps
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"non-finite loss at step {step}: lower learning_rate or resume from the last checkpoint")
                    acc.backward(loss)
                step_loss += loss.item()
            lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step was taken with
            grad_norm = dl.optimizer_step(self)
            self.step = step + 1
            # Every process has the same number of examples: the mean of their losses is the global batch's.
            step_loss = acc.reduce(torch.tensor(step_loss, device=acc.device), "mean").item()
            rec = {"step": self.step, "loss": step_loss, "lr": lr, **logs}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            dl.log_step(self, rec)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            dl.maybe_checkpoint(self)
        dl.finish(self, {"stage": "sft-diffusion", **asdict(cfg)})
        return self.history

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step)
