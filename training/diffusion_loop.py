"""What the three diffusion trainers share: trainable parameters, LoRA, checkpoints, resume and export.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNN/`` holding ``trainable.safetensors`` (only the
parameters being trained, plus the VAE's latent batch-norm statistics) and ``training_state.pt``
(step, optimizer, LR schedule, RNG states). The deliverable is ``<out>`` itself: a diffusers folder in
safetensors with any LoRA fused, so ``Flux2KleinPipeline.from_pretrained(out)`` loads it directly.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clvr_agent.training.diffusion_configs import LORA_TARGET_MODULES

BN_KEYS = ("vae.bn.running_mean", "vae.bn.running_var")


def add_lora(transformer, rank: int, alpha: float, target_modules: str = LORA_TARGET_MODULES) -> None:
    """Inject a peft LoRA adapter (diffusers' `add_adapter`); ``disable_adapters()`` then gives the base model."""
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )


def make_optimizer(params, *, lr: float, weight_decay: float, total_steps: int, schedule: str = "constant",
                   warmup_steps: int = 0, betas=(0.9, 0.999)):
    """AdamW plus a diffusers LR schedule (stepped once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: enable a module to train")
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return opt, get_scheduler(schedule, opt, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def has_lora(module) -> bool:
    return bool(getattr(module, "peft_config", None))


def set_trainable(pipe, *, transformer: bool, text_encoder: bool, vae: bool) -> dict[str, torch.nn.Module]:
    """Freeze everything, then unfreeze the chosen modules (only the LoRA weights when the transformer has one)."""
    chosen = {}
    for name, module, on in (
        ("transformer", pipe.transformer, transformer),
        ("text_encoder", pipe.text_encoder, text_encoder),
        ("vae", pipe.vae, vae),
    ):
        module.requires_grad_(False)
        module.eval()
        if not on:
            continue
        if name == "transformer" and has_lora(module):
            for pname, p in module.named_parameters():
                p.requires_grad_("lora_" in pname)
        else:
            module.requires_grad_(True)
        module.train()
        chosen[name] = module
    return chosen


def trainable_state(modules: dict[str, torch.nn.Module], vae) -> dict[str, torch.Tensor]:
    sd = {
        f"{name}.{pname}": p.detach().cpu().contiguous()
        for name, m in modules.items()
        for pname, p in m.named_parameters()
        if p.requires_grad
    }
    sd[BN_KEYS[0]] = vae.bn.running_mean.detach().cpu().clone()
    sd[BN_KEYS[1]] = vae.bn.running_var.detach().cpu().clone()
    return sd


@torch.no_grad()
def load_trainable_state(pipe, sd: dict[str, torch.Tensor]) -> None:
    for key, value in sd.items():
        name, rest = key.split(".", 1)
        target = getattr(pipe, name).get_parameter(rest) if "bn.running" not in rest else getattr(pipe.vae.bn, rest.rsplit(".", 1)[1])
        if target.shape != value.shape:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        target.copy_(value.to(target))


def rng_state(generator: torch.Generator, rng: random.Random) -> dict:
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": rng.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict, generator: torch.Generator, rng: random.Random) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    rng.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(out_dir, step: int, pipe, modules, optimizer, lr_scheduler, rng: dict, extra=None, keep=2) -> Path:
    """Write ``checkpoints/step-N`` atomically (tmp folder + rename) and keep the newest ``keep`` of them."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(modules, pipe.vae), str(tmp / "trainable.safetensors"))
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": rng,
         "extra": extra or {}},
        tmp / "training_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_trainer_checkpoint(trainer) -> None:
    """The main process writes the trainer's resumable checkpoint at ``trainer.step``; all processes wait.

    Shared by the diffusion trainers, which all hold ``accelerator, cfg, step, pipe, modules, optimizer,
    lr_scheduler, generator, rng``.
    """
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        save_checkpoint(trainer.cfg.output_dir, trainer.step, trainer.pipe, trainer.modules, trainer.optimizer,
                        trainer.lr_scheduler, rng_state(trainer.generator, trainer.rng), keep=trainer.cfg.keep_checkpoints)


def append_log(out_dir, record: dict) -> None:
    """One JSON line per logged step in ``<out_dir>/log.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def latest_checkpoint(out_dir) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, pipe, optimizer, lr_scheduler) -> dict:
    """Restore weights, optimizer and schedule; returns the saved state (``step``, ``rng``, ``extra``)."""
    load_trainable_state(pipe, load_file(str(ckpt / "trainable.safetensors")))
    state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    saved = state["lr_scheduler"].get("base_lrs")
    asked = list(getattr(lr_scheduler, "scheduler", lr_scheduler).base_lrs)  # accelerate wraps the scheduler
    if saved is not None and [round(x, 12) for x in saved] != [round(x, 12) for x in asked]:
        # Loading would silently restore the old rate; a changed rate needs a new run (or --out).
        raise ValueError(f"{ckpt} was trained with learning rate {saved[0]:g}, this run asks for {asked[0]:g}; "
                         "resume with the same --learning-rate, or start a new run in another --out")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state


@torch.no_grad()
def fused_transformer(transformer):
    """A plain copy of a LoRA-carrying transformer with ``W + ΔW`` baked in (base weights untouched)."""
    from peft.tuners.lora import LoraLayer

    sd = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                sd[f"{name}.weight"] = sd[f"{name}.weight"] + module.get_delta_weight(adapter).to(sd[f"{name}.weight"])
    fresh = type(transformer).from_config(transformer.config)
    fresh.load_state_dict(sd)
    if fresh.dtype != transformer.dtype:
        fresh.to(dtype=transformer.dtype)
    return fresh.to(transformer.device)


def export_pipeline(pipe, out_dir, *, is_distilled: bool | None = None, card: dict | None = None) -> Path:
    """Save ``pipe`` as a diffusers folder (safetensors), LoRA fused; ``is_distilled`` overrides the flag."""
    out = Path(out_dir)
    components = dict(pipe.components)
    if has_lora(pipe.transformer):
        components["transformer"] = fused_transformer(pipe.transformer)
    flag = pipe.config.is_distilled if is_distilled is None else is_distilled
    type(pipe)(**components, is_distilled=flag).save_pretrained(out, safe_serialization=True)
    if card is not None:
        (out / "training_args.json").write_text(json.dumps(card, indent=2, default=str))
    return out
