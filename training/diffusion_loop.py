"""What the three diffusion trainers share: trainable parameters, LoRA, the optimizer, export.

Checkpoints are :mod:`clvr_agent.training.checkpointing` (accelerate's ``save_state``). The deliverable is ``<out>`` itself: a diffusers folder in
safetensors with any LoRA fused, so ``Flux2KleinPipeline.from_pretrained(out)`` loads it directly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from clvr_agent.training import checkpointing as ck
from clvr_agent.training.diffusion_configs import LORA_TARGET_MODULES
from clvr_agent.seeds import derive_seed


def add_lora(transformer, rank: int, alpha: float, target_modules: str = LORA_TARGET_MODULES) -> None:
    """Inject a peft LoRA adapter (diffusers' `add_adapter`); ``disable_adapters()`` then gives the base model."""
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )


def make_optimizer(params, *, lr: float, weight_decay: float, total_steps: int, schedule: str = "constant",
                   warmup_steps: int = 0, betas=(0.9, 0.999)):
    """AdamW plus a diffusers LR schedule for ``total_steps`` optimizer steps (``checkpointing.step_schedule``)."""
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


def native_size(pipe) -> int:
    """The side a klein pipeline draws at when asked for no size: ``default_sample_size × vae_scale_factor``
    (1024 for the published checkpoints)."""
    return int(pipe.default_sample_size * pipe.vae_scale_factor)


def resolve_size(pipe, cfg) -> None:
    """``height = width = 0`` means the model's native size; checks the sides fit its latent grid."""
    if not cfg.height:
        cfg.height = cfg.width = native_size(pipe)
    mult = pipe.vae_scale_factor * 2
    if cfg.height % mult or cfg.width % mult:
        raise ValueError(f"height and width must be multiples of {mult} for this VAE, got {cfg.height}×{cfg.width}")


def setup(trainer, pipeline, cfg, *, transformer: bool = True, text_encoder: bool = False, vae: bool = False,
          find_unused_parameters: bool = False, schedule: str = "constant", warmup_steps: int = 0, betas=(0.9, 0.999)):
    """What every diffusion trainer's constructor does, in order; sets on ``trainer``:

    ``accelerator``; ``modules`` (name -> plain trained module, also on ``pipe``); ``run`` (name -> prepared
    module, to forward through so gradients synchronise); ``params``; ``optimizer``; ``lr_scheduler``
    (not prepared: see ``checkpointing.step_schedule``); this rank's ``rng`` and ``generator``;
    ``checkpointer``; ``step = 0``.
    """
    resolve_size(pipeline, cfg)
    trainer.accelerator = acc = ck.make_accelerator(cfg.mixed_precision, find_unused_parameters=find_unused_parameters)
    pipeline.to(acc.device)
    if cfg.lora_rank and not has_lora(pipeline.transformer):
        add_lora(pipeline.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    trainer.modules = set_trainable(pipeline, transformer=transformer, text_encoder=text_encoder, vae=vae)
    params = [p for m in trainer.modules.values() for p in m.parameters() if p.requires_grad]
    optimizer, trainer.lr_scheduler = make_optimizer(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, total_steps=cfg.max_steps, schedule=schedule,
        warmup_steps=warmup_steps, betas=betas)
    wrapped = acc.prepare(*trainer.modules.values(), optimizer)
    trainer.run = dict(zip(trainer.modules, wrapped[:-1]))
    trainer.optimizer = wrapped[-1]
    # After prepare: under FSDP the prepared modules hold the parameters that are clipped and stepped.
    trainer.params = [p for m in trainer.run.values() for p in m.parameters() if p.requires_grad]
    rank = acc.process_index
    trainer.rng = random.Random(derive_seed(cfg.seed, rank))
    trainer.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, rank))
    bn = pipeline.vae.bn
    trainer.checkpointer = ck.Checkpointer(
        acc, cfg.output_dir, modules=trainer.run, schedule=trainer.lr_scheduler,
        rngs=(trainer.generator, trainer.rng), keep=cfg.keep_checkpoints,
        fingerprint={"learning_rate": cfg.learning_rate, "lora_rank": cfg.lora_rank},
        # The latent BN statistics belong to the VAE even when it is frozen (set from data before training).
        extra={"latent_bn": (lambda: {"mean": bn.running_mean.detach().cpu().clone(), "var": bn.running_var.detach().cpu().clone()},
                             lambda sd: (bn.running_mean.copy_(sd["mean"]), bn.running_var.copy_(sd["var"])))})
    trainer.step = 0


def resume(trainer) -> bool:
    """With ``cfg.resume``, restore the newest checkpoint (an error if there is none); True if it did."""
    cfg = trainer.cfg
    if not cfg.resume:
        return False
    ckpt = ck.latest_checkpoint(cfg.output_dir)
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint under {Path(cfg.output_dir) / ck.CHECKPOINTS}; drop --resume to start fresh")
    with torch.no_grad():
        trainer.step = trainer.checkpointer.load(ckpt)
    return True


def optimizer_step(trainer) -> float | None:
    """Clip (if asked), step the optimizer, step the schedule once, zero the gradients; returns the grad norm."""
    acc, cfg = trainer.accelerator, trainer.cfg
    grad_norm = acc.clip_grad_norm_(trainer.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    trainer.optimizer.step()
    ck.step_schedule(trainer.optimizer, trainer.lr_scheduler)
    trainer.optimizer.zero_grad(set_to_none=True)
    return None if grad_norm is None else float(grad_norm)


def finish(trainer, card: dict, *, is_distilled: bool | None = None) -> None:
    """Final checkpoint, then the diffusers folder from the gathered state dicts (main process)."""
    acc = trainer.accelerator
    trainer.checkpointer.save(trainer.step)
    trained = dict(zip(trainer.run, ck.full_state_dicts(acc, list(trainer.run.values()))))
    if acc.is_main_process:
        export_pipeline(trainer.pipe, trainer.cfg.output_dir, trained=trained, is_distilled=is_distilled, card=card)
    acc.wait_for_everyone()


def log_step(trainer, rec: dict) -> None:
    """Keep ``rec`` in the history and append it to log.jsonl every ``log_every`` steps (main process)."""
    trainer.history.append(rec)
    cfg = trainer.cfg
    if trainer.accelerator.is_main_process and cfg.log_every and trainer.step % cfg.log_every == 0:
        append_log(cfg.output_dir, rec)


def maybe_checkpoint(trainer) -> None:
    cfg = trainer.cfg
    if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.max_steps:
        trainer.checkpointer.save(trainer.step)


@torch.no_grad()
def apply_checkpoint(pipe, ckpt: Path) -> int:
    """Apply a diffusion trainer's checkpoint (trained weights and latent BN statistics) to a plain pipeline,
    e.g. to sample or ship a running stage; returns the checkpoint's step. A LoRA checkpoint needs the
    same adapter on ``pipe.transformer`` first (``add_lora``)."""
    meta = ck.apply_checkpoint({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}, ckpt)
    bn = torch.load(Path(ckpt) / ck.STATE_FILE, map_location="cpu", weights_only=True)["latent_bn"]
    pipe.vae.bn.running_mean.copy_(bn["mean"])
    pipe.vae.bn.running_var.copy_(bn["var"])
    return int(meta["step"])


def append_log(out_dir, record: dict) -> None:
    """One JSON line per logged step in ``<out_dir>/log.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def fuse_lora(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-LoRA state dict with ``W + scale·B·A`` baked in, under the plain module's names."""
    out = {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k}
    for key, a in sd.items():
        if ".lora_A." in key:
            prefix, rest = key.split(".lora_A.", 1)
            b = sd[f"{prefix}.lora_B.{rest}"]
            w = out[f"{prefix}.weight"]
            out[f"{prefix}.weight"] = w + (scale * (b.float() @ a.float())).to(w)
    return out


def _fresh(module: torch.nn.Module) -> torch.nn.Module:
    """An untrained module of the same class and config, on the CPU."""
    return type(module).from_config(module.config) if hasattr(type(module), "from_config") else type(module)(module.config)


@torch.no_grad()
def export_pipeline(pipe, out_dir, *, trained: dict[str, dict] | None = None, is_distilled: bool | None = None,
                    card: dict | None = None) -> Path:
    """Save ``pipe`` as a diffusers folder (safetensors) with the ``trained`` full state dicts, LoRA fused.

    ``trained`` maps component names to state dicts from ``accelerator.get_state_dict`` (which gathers
    FSDP shards), so the export never reads a (possibly sharded) training module directly; a component
    not in it is saved as it is. ``is_distilled`` overrides the flag.
    """
    out = Path(out_dir)
    components = dict(pipe.components)
    trained = dict(trained or {})
    if has_lora(pipe.transformer) and "transformer" not in trained:
        trained["transformer"] = pipe.transformer.state_dict()
    for name, sd in trained.items():
        module = getattr(pipe, name)
        if has_lora(module):
            lora = module.peft_config["default"]
            sd = fuse_lora(sd, lora.lora_alpha / lora.r)
        fresh = _fresh(module)
        fresh.load_state_dict(sd)
        dtype = next(iter(sd.values())).dtype
        components[name] = fresh if fresh.dtype == dtype else fresh.to(dtype=dtype)
    flag = pipe.config.is_distilled if is_distilled is None else is_distilled
    type(pipe)(**components, is_distilled=flag).save_pretrained(out, safe_serialization=True)
    if card is not None:
        (out / "training_args.json").write_text(json.dumps(card, indent=2, default=str))
    return out
