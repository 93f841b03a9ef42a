"""Export a `clvr train sft-vlm` checkpoint (or finished run) of clvr-mini-vlm as a shippable Qwen3-VL folder.

A finished run's output folder is already a model; a checkpoint (``checkpoints/step-N``) holds the
tensors, so they are loaded into the init folder's model (the run trained every parameter:
``--train-vision``, LoRA rank 0) and saved with the processor and ``clvr_controller.json``.

Usage: python scripts/clvr_mini/ship_vlm.py INIT_DIR CHECKPOINT_DIR OUT_DIR [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from clvr_agent.tools.qwen3_vl import CONTROLLER_SETTINGS, load_qwen3_vl

MAX_MB = 30


def write_vlm_folder(out: Path, model, processor, settings: dict, info: dict) -> None:
    """A controller folder (weights, processor, ``clvr_controller.json``, ``clvr_mini_vlm.json``), built beside
    ``out`` and moved in place, so an interrupted run never leaves a half-written model where one was."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / CONTROLLER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    (tmp / "clvr_mini_vlm.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def init_record(init: Path) -> dict:
    """What an init folder says of itself: an init_vlm.py folder how it was built, a shipped folder what it was."""
    made = next((f for f in (init / "clvr_mini_vlm_init.json", init / "clvr_mini_vlm.json") if f.is_file()), None)
    return json.loads(made.read_text()) if made else {"folder": str(init)}


def export(init: Path, ckpt: Path, out: Path, note: str = "") -> dict:
    model, processor = load_qwen3_vl(str(init), torch_dtype="float32", device="cpu")
    # checkpoints/step-N/model.safetensors (accelerate's save_state); older runs wrote trainable.safetensors
    weights = ckpt / "model.safetensors" if (ckpt / "model.safetensors").is_file() else ckpt / "trainable.safetensors"
    sd = load_file(str(weights))
    params = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied to the embeddings
    missing = sorted(set(params) - set(sd))
    if missing or set(sd) - set(params):
        raise SystemExit(f"{ckpt} does not hold every parameter of {init} (a full fine-tune with --train-vision): "
                         f"missing {missing[:3]}, unexpected {sorted(set(sd) - set(params))[:3]}")
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value)
    settings = json.loads((init / CONTROLLER_SETTINGS).read_text())
    info = {"checkpoint": ckpt.name, "step": int(ckpt.name.rsplit("-", 1)[1]), "init": init_record(init), "note": note}
    write_vlm_folder(out, model, processor, settings, info)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    if size > MAX_MB:
        raise SystemExit(f"{out} is {size:.1f} MB, over the {MAX_MB} MB the package allows")
    return {**info, "megabytes": round(size, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("init", type=Path)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--note", default="")
    a = p.parse_args()
    print(json.dumps(export(a.init, a.checkpoint, a.out, a.note)))


if __name__ == "__main__":
    main()
