"""Diffusion trajectory SFT: flow matching for FLUX.2 [klein] on (accumulated prompt, references, target).

Each example asks the model to draw the target canvas from the accumulated prompt with up to three earlier
canvases as reference tokens, exactly what the executor asks at each step of the loop. The transformer,
the text encoder and the VAE (reconstruction loss) can each be trained; the transformer fully or with LoRA.
Single process or ``accelerate launch`` (DDP) with no change.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from clvr_agent.training import diffusion_loop as dl
from clvr_agent.training.diffusion_configs import SFTDiffusionConfig
from clvr_agent.training import flow_matching as fm
from clvr_agent.tools.flux2_klein import prompt_max_length


@dataclass
class SFTExample:
    prompt: str
    references: list[str]
    target: str


class SFTDiffusionDataset:
    """Examples from a JSONL of ``{"prompt", "references": [png], "target": png}`` or trajectory records.

    A trajectory record (``clvr_agent.types.Trajectory``) yields one example per step that drew a canvas,
    executed (passive check) and was accepted: ``(request.accumulated_prompt, request.references, canvas)``.
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
            return [
                SFTExample(s.request.accumulated_prompt, [res(r.path) for r in s.request.references], res(s.canvas.path))
                for s in traj.steps
                if s.canvas is not None and s.accepted and s.error is None and (s.passive is None or s.passive.executed)
            ]
        return [SFTExample(str(rec["prompt"]), [res(p) for p in rec.get("references", [])], res(rec["target"]))]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


class SFTDiffusionTrainer:
    """``SFTDiffusionTrainer(pipeline, config, dataset).train()`` -> list of logged metrics."""

    def __init__(self, pipeline, config: SFTDiffusionConfig, dataset: SFTDiffusionDataset):
        from accelerate import Accelerator

        self.pipe, self.cfg, self.dataset = pipeline, config, dataset
        mult = pipeline.vae_scale_factor * 2
        if config.height % mult or config.width % mult:
            raise ValueError(f"height and width must be multiples of {mult} for this VAE, got {config.height}×{config.width}")
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        pipeline.to(self.accelerator.device)
        if config.lora_rank and not dl.has_lora(pipeline.transformer):
            dl.add_lora(pipeline.transformer, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        self.modules = dl.set_trainable(pipeline, transformer=config.train_transformer,
                                        text_encoder=config.train_text_encoder, vae=config.train_vae)
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer, self.lr_scheduler = dl.make_optimizer(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, total_steps=config.max_steps,
            schedule=config.lr_scheduler, warmup_steps=config.warmup_steps, betas=(config.adam_beta1, config.adam_beta2))
        # Forward through the prepared (DDP) wrappers so gradients synchronise; `pipe` keeps the plain modules.
        wrapped = self.accelerator.prepare(*self.modules.values(), self.optimizer, self.lr_scheduler)
        wrapped = wrapped if isinstance(wrapped, (list, tuple)) else [wrapped]
        self.run = {n: w for n, w in zip(self.modules, wrapped)}
        self.optimizer, self.lr_scheduler = wrapped[len(self.modules)], wrapped[len(self.modules) + 1]
        self.rng = random.Random(config.seed + 7919 * self.accelerator.process_index)
        self.generator = torch.Generator().manual_seed(config.seed + 7919 * self.accelerator.process_index)
        self.step = 0
        self.history: list[dict] = []
        self._perms: dict[int, list[int]] = {}

    # -- data ---------------------------------------------------------------------------------------

    def _open(self, path: str) -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")

    def batch_indices(self, step: int) -> list[int]:
        """Examples of optimizer step ``step`` on this process: a function of the step, so resume is exact."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.cfg.batch_size * world
        out = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(k, len(self.dataset))
            if epoch not in self._perms:
                perm = list(range(len(self.dataset)))
                random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(perm)
                self._perms = {epoch: perm}
            out.append(self._perms[epoch][pos])
        return out[rank::world]

    @torch.no_grad()
    def set_bn_stats_from_data(self) -> None:
        n = min(self.cfg.bn_stats_samples, len(self.dataset))
        batches = (
            fm.to_pixels(self.pipe, [self._open(self.dataset[i].target) for i in range(s, min(s + 16, n))], self.cfg.height, self.cfg.width)
            for s in range(0, n, 16)
        )
        fm.set_latent_bn_stats(self.pipe.vae, *fm.latent_bn_stats(self.pipe, batches))

    # -- loss ---------------------------------------------------------------------------------------

    def loss(self, examples: Sequence[SFTExample]) -> tuple[torch.Tensor, dict]:
        """Flow-matching loss on the target tokens (+ VAE reconstruction); micro-batches grouped by #references."""
        cfg, pipe = self.cfg, self.pipe
        prompts = fm.drop_conditions([e.prompt for e in examples], cfg.cfg_dropout, self.rng)
        total, logs = 0.0, {}
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(examples):
            groups.setdefault(min(len(e.references), cfg.max_references), []).append(i)
        for k, idx in sorted(groups.items()):
            targets = fm.to_pixels(pipe, [self._open(examples[i].target) for i in idx], cfg.height, cfg.width)
            with torch.no_grad():  # targets are data: the VAE learns only from its reconstruction loss
                raw = fm.raw_latents(pipe, targets)
                if cfg.train_vae and self.pipe.vae.training:  # not while evaluating
                    self._update_bn(raw)
                x0 = fm.normalize_latents(pipe, raw)
                refs = None
                if k:
                    paths = [p for i in idx for p in examples[i].references[-k:]]
                    ref_px = fm.to_pixels(pipe, [self._open(p) for p in paths], cfg.height, cfg.width)
                    refs = fm.encode_images(pipe, ref_px).unflatten(0, (len(idx), k))  # (B, K, 4C, h, w)
            embeds, text_ids = fm.encode_text(
                pipe, [prompts[i] for i in idx], text_encoder=self.run.get("text_encoder"),
                max_sequence_length=cfg.max_sequence_length or prompt_max_length(pipe), text_encoder_out_layers=cfg.text_encoder_out_layers,
            )
            cond = fm.make_condition(pipe, embeds, text_ids, refs)
            x0_tok, x_ids = fm.pack_target(pipe, x0)  # (B, 4C, h, w) -> (B, h·w, 4C)
            sigma = fm.sample_sigmas(len(idx), mean=cfg.logit_mean, std=cfg.logit_std, shift=cfg.timestep_shift,
                                     generator=self.generator).to(x0.device)
            noise = torch.randn(x0_tok.shape, generator=self.generator).to(x0_tok)
            x_t, target = fm.noisy_target(x0_tok, noise, sigma)
            transformer = self.run.get("transformer", pipe.transformer)
            with self.accelerator.autocast():
                pred = fm.transformer_forward(transformer, x_t, x_ids, sigma, cond)
            fm_loss = fm.flow_matching_loss(pred, target, x0_tok.shape[1])
            total = total + fm_loss * len(idx) / len(examples)
            logs[f"loss_refs{k}"] = fm_loss.item()
            if cfg.train_vae:
                recon = self.run["vae"](targets).sample
                rec = torch.mean((recon.float() - targets.float()) ** 2)
                total = total + cfg.vae_loss_weight * rec * len(idx) / len(examples)
                logs["vae_recon"] = rec.item()
        return total, logs

    @torch.no_grad()
    def _update_bn(self, raw: torch.Tensor) -> None:
        bn, m = self.pipe.vae.bn, self.cfg.bn_momentum
        x = raw.float().transpose(0, 1).flatten(1)  # (B, 4C, h, w) -> (4C, B·h·w)
        bn.running_mean.mul_(1 - m).add_(m * x.mean(1))
        bn.running_var.mul_(1 - m).add_(m * x.var(1))

    # -- loop ---------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        ckpt = dl.latest_checkpoint(out) if cfg.resume else None
        if cfg.resume and ckpt is None:
            raise ValueError(f"--resume: no checkpoint under {out / 'checkpoints'}; drop --resume to start fresh")
        if ckpt is not None:
            state = dl.load_checkpoint(ckpt, self.pipe, self.optimizer, self.lr_scheduler)
            dl.set_rng_state(state["rng"], self.generator, self.rng)
            self.step = state["step"]
        elif cfg.set_bn_stats:
            self.set_bn_stats_from_data()
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        micro = cfg.batch_size // cfg.gradient_accumulation_steps
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="sft-diffusion",
                   disable=not acc.is_local_main_process)
        for step in bar:
            examples = [self.dataset[i] for i in self.batch_indices(step)]
            step_loss, logs = 0.0, {}
            for s in range(0, len(examples), micro):
                loss, logs = self.loss(examples[s : s + micro])
                loss = loss / cfg.gradient_accumulation_steps
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"non-finite loss at step {step}: lower learning_rate or resume from the last checkpoint")
                acc.backward(loss)
                step_loss += loss.item()
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            rec = {"step": self.step, "loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0], **logs}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            self.history.append(rec)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if acc.is_main_process and cfg.log_every and self.step % cfg.log_every == 0:
                dl.append_log(out, rec)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        if acc.is_main_process:
            dl.export_pipeline(self.pipe, out, card={"stage": "sft-diffusion", **asdict(cfg)})
        acc.wait_for_everyone()
        return self.history

    def save_checkpoint(self) -> None:
        dl.save_trainer_checkpoint(self)
