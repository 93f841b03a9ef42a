"""Resumable checkpoints for every trainer, written by ``accelerator.save_state`` and read by ``load_state``.

A checkpoint is ``<out>/checkpoints/step-NNNNNNN/``: accelerate's own files (``model.safetensors``,
``model_1.safetensors``, … for the prepared modules in order; ``optimizer.bin``; ``random_states_<rank>.pkl``
with every rank's global torch/numpy/python RNG; the fp16 grad scaler) plus ours: ``trainer_state.pt``
(LR schedule and any extra tensors, from the main process), ``rng_<rank>.pt`` (each rank's own
``torch.Generator`` and ``random.Random``) and ``checkpoint.json`` (step, module names, the settings a
resume must repeat). Everything is read with ``weights_only=True``.

Going through ``save_state`` keeps FSDP possible: accelerate gathers or shards the model and optimizer
itself. Without FSDP a module that is partly frozen (a LoRA) stores only its trainable parameters and its
buffers, under the plain module's names, so a checkpoint does not depend on the number of processes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


def make_accelerator(mixed_precision: str, *, find_unused_parameters: bool = False):
    """An ``Accelerator``; ``find_unused_parameters`` where some trained parameters can get no gradient in a step
    (DDP otherwise fails with "Expected to have finished reduction in the prior iteration").

    ``broadcast_buffers=False``: DDP would broadcast every buffer at the start of each forward, a collective,
    and the diffusion trainers run one forward per reference-count group, whose number differs between
    processes (a hang). No buffer here is learned by DDP: RoPE tables are fixed, and the VAE's latent BN
    statistics are updated by the trainer from all processes' latents.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[ddp])


def step_schedule(optimizer, lr_scheduler) -> None:
    """Advance the LR schedule by one optimizer step, unless the optimizer skipped it (fp16 overflow).

    The schedule is never passed to ``accelerator.prepare()``: accelerate's ``AcceleratedScheduler`` steps
    it ``num_processes`` times per call (it assumes the schedule was built for ``max_steps × N`` dataloader
    batches), so an N-process run would reach the end of a ``max_steps`` schedule after ``max_steps / N``.
    Our trainers count optimizer steps, whatever N is, so the schedule is built for ``max_steps`` and
    stepped once here; this is the one part of accelerate's wrapper kept (skipped fp16 steps).
    """
    if not getattr(optimizer, "step_was_skipped", False):
        lr_scheduler.step()


def latest_checkpoint(out_dir) -> Path | None:
    found = sorted((Path(out_dir) / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def _kept_names(module: torch.nn.Module) -> set[str] | None:
    """State-dict keys a checkpoint stores for ``module``: all (None) unless some parameters are frozen."""
    params = list(module.named_parameters())
    if all(p.requires_grad for _, p in params):
        return None
    kept = {n for n, p in params if p.requires_grad} | {n for n, _ in module.named_buffers()}
    return kept & set(module.state_dict())


class Checkpointer:
    """Save and restore one trainer's state; every process calls ``save`` and ``load``.

    ``modules``: names of the modules passed to ``accelerator.prepare`` (in that order) with their prepared
    objects; ``schedule``: the (unprepared) LR scheduler; ``rngs``: this rank's own generator and Random, if
    the trainer keeps any (accelerate saves every rank's global torch, numpy and python RNG itself);
    ``fingerprint``: settings a resumed run must repeat (a changed learning rate would be silently lost);
    ``extra``: name -> (get, set) for more tensor state kept by the main process (latent BN statistics).
    """

    def __init__(self, accelerator, out_dir, *, modules: dict[str, Any], schedule,
                 rngs: tuple[torch.Generator, random.Random] | None = None,
                 keep: int = 2, fingerprint: dict | None = None,
                 extra: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] | None = None):
        self.acc, self.root = accelerator, Path(out_dir) / CHECKPOINTS
        self.names, self.modules = list(modules), list(modules.values())
        self.schedule, self.rngs, self.keep = schedule, rngs, keep
        self.fingerprint, self.extra = dict(fingerprint or {}), dict(extra or {})
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # accelerate calls these with the prepared models (not under FSDP/DeepSpeed, which save their own way).
    def _save_hook(self, models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            plain = self.acc.unwrap_model(model)
            keep = _kept_names(plain)
            sd = plain.state_dict()
            seen: set[int] = set()
            out = {}
            for k, v in sd.items():
                if keep is not None and k not in keep:
                    continue
                # Tied weights share storage, which safetensors refuses: store an independent copy.
                out[k] = v.detach().clone() if v.data_ptr() in seen else v.detach().contiguous()
                seen.add(v.data_ptr())
            weights[i] = out

    def _load_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        plain_models = [self.acc.unwrap_model(m) for m in models]
        models.clear()  # we load them: accelerate would load strictly and expect prefixed names
        for i, plain in enumerate(plain_models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            sd = load_file(str(path))
            keep = _kept_names(plain)
            missing = sorted((set(plain.state_dict()) if keep is None else keep) - set(sd))
            unexpected = sorted(set(sd) - set(plain.state_dict()))
            if missing or unexpected:
                raise ValueError(f"checkpoint {input_dir} does not match the {self.names[i]} being trained (LoRA rank, "
                                 f"trained modules): missing {missing[:3]}, unexpected {unexpected[:3]}")
            plain.load_state_dict(sd, strict=False)

    def save(self, step: int) -> Path:
        acc = self.acc
        final, tmp = self.root / f"step-{step:07d}", self.root / f".tmp-step-{step:07d}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        own = {} if self.rngs is None else {"generator": self.rngs[0].get_state(), "python": self.rngs[1].getstate()}
        torch.save(own, tmp / f"rng_{acc.process_index}.pt")
        if acc.is_main_process:
            torch.save({"lr_scheduler": self.schedule.state_dict(), **{k: get() for k, (get, _) in self.extra.items()}},
                       tmp / STATE_FILE)
            meta = {"step": step, "modules": self.names, "num_processes": acc.num_processes, **self.fingerprint}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.root.glob("step-*"))[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path) -> int:
        """Restore everything from ``ckpt``; returns its step."""
        acc = self.acc
        meta = read_meta(ckpt)
        for key, asked in self.fingerprint.items():
            saved = meta.get(key)
            if saved is not None and saved != asked:
                raise ValueError(f"{ckpt} was trained with {key} {saved}, this run asks for {asked}; resume with the "
                                 f"same setting, or start a new run in another --out")
        if meta.get("modules") != self.names:
            raise ValueError(f"{ckpt} holds {meta.get('modules')}, this run trains {self.names}; use the same trained modules")
        rng_file = ckpt / f"rng_{acc.process_index}.pt"
        if not rng_file.is_file():
            raise ValueError(f"{ckpt} was written by {meta.get('num_processes')} process(es); resume with at most that many")
        acc.load_state(str(ckpt))
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.schedule.load_state_dict(state["lr_scheduler"])
        for k, (_, put) in self.extra.items():
            put(state[k])
        if self.rngs is not None:
            own = torch.load(rng_file, map_location="cpu", weights_only=True)
            self.rngs[0].set_state(own["generator"])
            self.rngs[1].setstate(_as_random_state(own["python"]))
        return int(meta["step"])


def _as_random_state(state):
    """``random.Random.getstate()`` comes back from ``torch.load`` as nested lists/tuples; setstate needs tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / META_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt} is not a checkpoint of this trainer version (no {META_FILE}); start a new run in another --out")
    return json.loads(path.read_text())


@torch.no_grad()
def apply_checkpoint(modules: dict[str, torch.nn.Module], ckpt: Path) -> dict:
    """Load a checkpoint's weights into plain modules (no accelerator), e.g. to sample or export mid-run.

    Every module the checkpoint holds must be in ``modules`` and have its parameters (LoRA included);
    returns the checkpoint's metadata.
    """
    from safetensors.torch import load_file

    meta = read_meta(ckpt)
    for i, name in enumerate(meta["modules"]):
        if name not in modules:
            raise ValueError(f"{ckpt} trains {name}; pass that module too")
        sd = load_file(str(Path(ckpt) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
        unexpected = sorted(set(sd) - set(modules[name].state_dict()))
        if unexpected:
            raise ValueError(f"{ckpt}: {name} has no {unexpected[:3]} (a LoRA checkpoint needs the same adapter)")
        modules[name].load_state_dict(sd, strict=False)
    return meta


def full_state_dicts(accelerator, prepared: Sequence) -> list[dict]:
    """Full (gathered) state dicts of prepared modules; every process must call it (FSDP gathers to rank 0)."""
    return [accelerator.get_state_dict(m) for m in prepared]
