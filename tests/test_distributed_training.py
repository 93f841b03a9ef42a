"""`clvr train sft-diffusion` with 2 CPU processes (torchrun, gloo) trains what 1 process trains.

The same global batch (2 processes × 2 micro-batches of 1 example vs 1 × 4) must give the same learning rate at every
step, the same losses and weights within float tolerance, and a run resumed from a mid-run checkpoint
must continue exactly as the uninterrupted one. The text encoder trains too, and the model folder
stacks hidden states (9, 18, 26), so its top layer gets no gradient and DDP has to be told.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

H = W = 16
STEPS = 4
CONFIG = dict(height=H, width=W, max_sequence_length=48, max_steps=STEPS, learning_rate=3e-3, lr_scheduler="linear",
              warmup_steps=1, cfg_dropout=0.25, bn_stats_samples=4, train_text_encoder=True, log_every=0,
              checkpoint_every=2, keep_checkpoints=2)
GLOBAL_BATCH = 4


def _data(root) -> None:
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240),
               "black": (10, 10, 10), "yellow": (230, 220, 20)}
    for name, rgb in colours.items():
        Image.new("RGB", (H, H), rgb).save(root / f"{name}.png")
    names = list(colours)
    recs = [{"prompt": f"a {n} canvas", "references": [f"{m}.png" for m in names[:i % 3]], "target": f"{n}.png"}
            for i, n in enumerate(names)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def _trainer(root, out, world: int, **kw):
    from diffusers import Flux2KleinPipeline

    from clvr_agent.training.sft_diffusion import SFTDiffusionConfig, SFTDiffusionDataset, SFTDiffusionTrainer

    cfg = SFTDiffusionConfig(output_dir=str(out), batch_size=GLOBAL_BATCH // world, **{**CONFIG, **kw})
    pipe = Flux2KleinPipeline.from_pretrained(str(root / "model"))
    return SFTDiffusionTrainer(pipe, cfg, SFTDiffusionDataset.from_jsonl(root / "sft.jsonl"))


def _trained(trainer) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().cpu().clone() for n, m in trainer.modules.items() for k, v in m.state_dict().items()}


def worker(root) -> None:
    """Under torchrun: a straight run, then the same run killed after its mid-run checkpoint and resumed."""
    from safetensors.torch import save_file

    out = root / "two"
    straight = _trainer(root, out, 2, gradient_accumulation_steps=2)
    straight.train()
    acc = straight.accelerator
    rank = acc.process_index
    if acc.is_main_process:
        shutil.rmtree(out / "checkpoints" / f"step-{STEPS:07d}")
    acc.wait_for_everyone()
    resumed = _trainer(root, out, 2, gradient_accumulation_steps=2, resume=True)
    resumed.train()
    if rank == 0:
        (root / "two.json").write_text(json.dumps({"straight": straight.history, "resumed": resumed.history,
                                                   "world": acc.num_processes}))
        save_file(_trained(straight), str(root / "two-straight.safetensors"))
        save_file(_trained(resumed), str(root / "two-resumed.safetensors"))


def test_two_processes_train_what_one_trains_and_resume_is_exact(tmp_path):
    
    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    from clvr_agent.tools.flux2_klein import OUT_LAYERS_KEY

    pipe = build_tiny_flux2_klein(distilled=False, seed=0)
    # The folder stacks hidden states 9, 18, 26 of the 27-layer text encoder: its top layer gets no gradient.
    setattr(pipe.text_encoder.config, OUT_LAYERS_KEY, [9, 18, 26])
    pipe.save_pretrained(tmp_path / "model")
    _data(tmp_path)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = _trainer(tmp_path, tmp_path / "one", 1)  # the 1-process reference meanwhile, in this process
    one.train()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2

    # linear schedule, 1 warm-up step: the rate each step was taken with
    want_lr = [0.0] + [3e-3 * (STEPS - s) / (STEPS - 1) for s in range(1, STEPS)]
    assert [r["lr"] for r in one.history] == pytest.approx(want_lr, abs=1e-12)
    assert [r["lr"] for r in two["straight"]] == pytest.approx(want_lr, abs=1e-12)
    # the same global batch: the same losses and weights, up to the order of float sums
    assert [r["loss"] for r in two["straight"]] == pytest.approx([r["loss"] for r in one.history], rel=1e-4)
    w1, w2 = _trained(one), load_file(str(tmp_path / "two-straight.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)

    # resumed after the mid-run checkpoint: the remaining steps exactly as the uninterrupted run
    half = STEPS // 2
    assert [r["step"] for r in two["resumed"]] == list(range(half + 1, STEPS + 1))
    assert [r["lr"] for r in two["resumed"]] == pytest.approx(want_lr[half:], abs=1e-12)
    assert [r["loss"] for r in two["resumed"]] == pytest.approx([r["loss"] for r in two["straight"][half:]], rel=1e-6)
    for k, v in load_file(str(tmp_path / "two-resumed.safetensors")).items():
        torch.testing.assert_close(v, w2[k], rtol=1e-6, atol=1e-7, msg=k)
    # each rank's own RNG is in the checkpoint, and they differ
    ckpt = tmp_path / "two" / "checkpoints" / f"step-{half:07d}"
    r0, r1 = (torch.load(ckpt / f"rng_{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["generator"], r1["generator"])


if __name__ == "__main__":
    from pathlib import Path

    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
