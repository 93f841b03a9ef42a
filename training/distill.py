"""k-step trajectory distillation: a base (CFG) klein into a 4-step, guidance-free student of the same layout.

The teacher (the pipeline's weights before training) integrates each condition from noise with CFG on a
fine Euler grid that contains the student's σ grid (the one `Flux2KleinPipeline` uses at
``num_inference_steps=student_steps``), and its states at the student's grid points are cached. The
student, initialised from the teacher, regresses per segment either

* ``trajectory``: the teacher's exact segment velocity ``(x_{i+1} - x_i)/(σ_{i+1} - σ_i)`` at ``x_i``
  (a perfect fit makes the student's Euler steps land on the teacher's states), or
* ``endpoint``: k-step reflow, straight lines from the noise to the teacher's endpoint.

Because the parameter layout is unchanged, ``θ_student − θ_base`` is a well-defined delta for DSWM. The
result is saved with ``is_distilled=True`` so the pipeline skips CFG.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from clvr_agent.training import diffusion_loop as dl
from clvr_agent.training.diffusion_configs import DistillConfig
from clvr_agent.training import flow_matching as fm
from clvr_agent.tools.flux2_klein import prompt_max_length
from clvr_agent.training.pprl import plain_proxy


def teacher_grid(student_sigmas: torch.Tensor, substeps: int) -> torch.Tensor:
    """A fine σ grid through every student grid point: ``substeps`` equal pieces per student segment."""
    pieces = [torch.linspace(float(a), float(b), substeps + 1)[:-1] for a, b in zip(student_sigmas[:-1], student_sigmas[1:])]
    return torch.cat(pieces + [student_sigmas[-1:].float()])


class DistillTrainer:
    """``DistillTrainer(pipeline, config, prompts).train()``; ``prompts``: strings or ``{prompt, references}``."""

    def __init__(self, pipeline, config: DistillConfig, prompts: Sequence[Any]):
        if not prompts:
            raise ValueError("distillation needs at least one prompt")
        self.pipe, self.cfg, self.prompts = pipeline, config, list(prompts)
        dl.setup(self, pipeline, config, schedule=config.lr_scheduler, warmup_steps=config.warmup_steps)
        self.student = self.run["transformer"]
        self._conds: dict[tuple[int, bool], fm.Condition] = {}
        self.cache: dict | None = None
        self.history: list[dict] = []

    @torch.no_grad()
    def condition(self, i: int, uncond: bool = False) -> fm.Condition:
        """The (cached) condition of prompt ``i`` with batch 1; ``uncond`` = empty prompt, same references."""
        if (i, uncond) not in self._conds:
            cfg, pipe = self.cfg, self.pipe
            proxy = plain_proxy(self.prompts[i])
            refs = None
            if proxy.references:
                refs = fm.to_pixels(pipe, proxy.references, cfg.height, cfg.width).unsqueeze(0)  # (1, K, 3, H, W)
            emb = fm.encode_text(pipe, ["" if uncond else proxy.text], max_sequence_length=cfg.max_sequence_length or prompt_max_length(pipe))
            self._conds[(i, uncond)] = fm.make_condition(pipe, *emb, refs)
        return self._conds[(i, uncond)]

    def batch_condition(self, idx: Sequence[int], uncond: bool = False) -> fm.Condition:
        cs = [self.condition(i, uncond) for i in idx]
        cat = lambda name: None if getattr(cs[0], name) is None else torch.cat([getattr(c, name) for c in cs])  # noqa: E731
        return fm.Condition(cat("prompt_embeds"), cat("text_ids"), cat("ref_tokens"), cat("ref_ids"))

    def student_sigmas(self, seq_len: int) -> torch.Tensor:
        return fm.inference_sigmas(self.pipe, self.cfg.student_steps, seq_len)

    @torch.no_grad()
    def build_cache(self) -> dict:
        """Teacher trajectories at the student's grid points: ``states (P, K+1, N, C)``, ``prompt (P,)``."""
        cfg, pipe = self.cfg, self.pipe
        self.student.eval()
        states, prompt_idx = [], []
        sub = cfg.teacher_steps // cfg.student_steps
        for start in tqdm(range(0, cfg.num_pairs, cfg.batch_size), desc="teacher", disable=not self.accelerator.is_local_main_process):
            n = min(cfg.batch_size, cfg.num_pairs - start)
            idx = [(start + k) % len(self.prompts) for k in range(n)]
            for ref_count, group in _group_by_refs(self, idx).items():
                x, x_ids = fm.noise_tokens(pipe, len(group), cfg.height, cfg.width, self.generator)
                s_student = self.student_sigmas(x.shape[1])
                traj, _ = fm.sample_flow(self.student, x, x_ids, self.batch_condition(group), teacher_grid(s_student, sub),
                                         uncond=self.batch_condition(group, uncond=True), guidance_scale=cfg.guidance_scale)
                states.append(traj[:, ::sub].cpu())  # (B, K+1, N, C)
                prompt_idx.extend(group)
        self.student.train()
        return {"states": torch.cat(states), "prompt": torch.tensor(prompt_idx), "x_ids": x_ids[:1].cpu()}

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean-squared error of the student's velocity against the teacher's, one random segment per row."""
        cfg, cache = self.cfg, self.cache
        total = 0.0
        for _, group in _group_by_refs(self, rows.tolist(), key=lambda r: int(cache["prompt"][r])).items():
            st = cache["states"][group].to(self.accelerator.device)  # (B, K+1, N, C)
            b = st.shape[0]
            sig = self.student_sigmas(st.shape[2]).to(st.device)
            seg = torch.randint(0, cfg.student_steps, (b,), generator=self.generator).to(st.device)
            s_i, s_j = sig[seg], sig[seg + 1]
            ar = torch.arange(b, device=st.device)
            if cfg.target == "trajectory":
                x = st[ar, seg]
                target = (st[ar, seg + 1] - x) / (s_j - s_i).view(-1, 1, 1)
            else:
                z0, x1 = st[:, 0], st[:, -1]
                x, target = fm.noisy_target(x1, z0, s_i)
            cond = self.batch_condition([int(cache["prompt"][r]) for r in group])
            x_ids = cache["x_ids"].to(st.device).expand(b, -1, -1)
            with self.accelerator.autocast():
                pred = fm.transformer_forward(self.student, x.contiguous(), x_ids, s_i, cond)
            total = total + fm.flow_matching_loss(pred, target, x.shape[1]) * b / len(rows)
        return total

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        cache_path = out / f"teacher_cache-{acc.process_index}.pt"
        if cfg.resume and not cache_path.is_file():
            raise ValueError(f"--resume: no teacher cache {cache_path.name} under {out}; drop --resume to start fresh")
        if dl.resume(self):  # the cached trajectories came from the original teacher: never regenerate them
            self.cache = torch.load(cache_path, weights_only=True)
        else:
            self.cache = self.build_cache()
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.cache, cache_path)
        n = self.cache["states"].shape[0]
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="distill",
                   disable=not acc.is_local_main_process)
        for step in bar:
            rows = torch.randint(0, n, (min(cfg.batch_size, n),), generator=self.generator)
            loss = self.loss(rows)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite distillation loss at step {step}: lower learning_rate")
            acc.backward(loss)
            lr = self.lr_scheduler.get_last_lr()[0]
            grad_norm = dl.optimizer_step(self)
            self.step = step + 1
            rec = {"step": self.step, "loss": acc.reduce(loss.detach(), "mean").item(), "lr": lr}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            dl.log_step(self, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            dl.maybe_checkpoint(self)
        dl.finish(self, {"stage": "distill", **asdict(cfg)}, is_distilled=True)
        return self.history

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step)


def _group_by_refs(trainer: DistillTrainer, items: Sequence[int], key=lambda i: i) -> dict[int, list[int]]:
    """Items grouped by their prompt's reference count (a batch's sequences must have equal length)."""
    groups: dict[int, list[int]] = {}
    for it in items:
        c = trainer.condition(key(it))
        groups.setdefault(0 if c.ref_tokens is None else c.ref_tokens.shape[1], []).append(it)
    return groups
