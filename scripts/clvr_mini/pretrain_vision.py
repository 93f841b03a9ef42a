"""Canvas-reading pretraining of clvr-mini-vlm's vision tower: each image token learns the objects in its cell.

Linear probes on the trained clvr-mini-vlm's image tokens (issue 18) found they hardly encode the canvas:
whether a colour or a shape is anywhere on it is read at 0.59-0.63 balanced accuracy (0.5 is chance), below a
linear probe on the raw 16x16 pixels. The controller calls never require looking (the text predicts most
verdicts), so SFT on them never taught the tower to see. This stage does, as vision pretraining precedes
instruction tuning: the tower (and its merger) is trained to tell, for each image token's cell of the canvas,
which colour+shape objects have their centre there (the ShapeWorld detector's reading of the pixels is the
target), through a linear head that is thrown away afterwards. The language model is untouched here; the
controller SFT that follows (E's recipe) teaches it to read the new tokens.

The images are downscaled exactly as the controller sends them (``conversation.downscale`` to the folder's
``image_size``) and patchified by the folder's own processor, so the tower learns the tokens inference gives it.

Usage: python scripts/clvr_mini/pretrain_vision.py INIT_DIR OUT_DIR SRC [SRC ...] [--steps 3000]
       [--batch-size 64] [--learning-rate 1e-3] [--images 16000] [--heldout 1000] [--seed 0] [--word-head]
       [--probe]
``--word-head`` reads the colour and shape labels through the language model's own input embeddings of those
words (a cell's colour logit is its token's dot product with the embedding of " red"), for the main merger and
each deepstack merger alike: the image tokens learn to look like the words that name what is in their cell,
so the language model can match a prompt's words against the canvas the way it matches repeated words in text
(issue 18: with a free head the tower read colour at 0.99, yet the controller never learned to ask it which
colour the prompt names). The tokens are also held near the text embeddings' norm.
``--probe`` freezes the tower and trains only the head: the same readings as a linear probe of any folder's tower
(what found the shipped one blind), written to OUT_DIR/probe.json.
SRC: folders whose ``**/*.png`` are ShapeWorld canvases (e.g. `clvr synth` outputs). Writes OUT_DIR as a full
controller folder (built beside it, moved in) whose ``clvr_mini_vlm.json`` records the stage and its held-out
readings; bad input exits 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from ship_vlm import init_record, write_vlm_folder  # noqa: E402

from clvr_agent.tools.conversation import downscale  # noqa: E402
from clvr_agent.tools.qwen3_vl import CONTROLLER_SETTINGS, load_qwen3_vl  # noqa: E402
from clvr_agent.tools.shapeworld.detect import detect  # noqa: E402
from clvr_agent.tools.shapeworld.world import CLASSES as SHAPES  # noqa: E402
from clvr_agent.tools.shapeworld.world import PALETTE  # noqa: E402

COLOURS = list(PALETTE)
# per cell: one label per colour+shape pair, then per colour, then per shape
N_LABELS = len(COLOURS) * len(SHAPES) + len(COLOURS) + len(SHAPES)


def cell_targets(image, grid: int) -> np.ndarray:
    """(grid*grid, N_LABELS) multi-hot: which colour+shape objects have their box centre in each cell."""
    out = np.zeros((grid * grid, N_LABELS), dtype=np.float32)
    for d in detect(image):
        if d.color not in PALETTE or d.cls not in SHAPES:
            continue
        c, s = COLOURS.index(d.color), SHAPES.index(d.cls)
        x0, y0, x1, y1 = d.box
        col = min(grid - 1, int((x0 + x1) / 2 / image.width * grid))
        row = min(grid - 1, int((y0 + y1) / 2 / image.height * grid))
        cell = out[row * grid + col]
        cell[c * len(SHAPES) + s] = cell[len(COLOURS) * len(SHAPES) + c] = cell[-len(SHAPES) + s] = 1.0
    return out


def read_images(sources: list[Path], n: int, size: int, grid: int, seed: int):
    paths = sorted({p for src in sources for p in src.rglob("*.png")})
    random.Random(seed).shuffle(paths)
    images, targets = [], []
    for p in paths[:n]:
        with Image.open(p) as im:
            canvas = im.convert("RGB")
        targets.append(cell_targets(canvas, grid))
        images.append(downscale(canvas, size))
    return images, np.stack(targets)


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over labels (with both classes present) of the mean of the per-class recalls."""
    pred, truth = logits > 0, targets > 0.5
    scores = []
    for j in range(truth.shape[1]):
        pos, neg = truth[:, j], ~truth[:, j]
        if pos.any() and neg.any():
            scores.append(0.5 * (pred[pos, j].float().mean() + (~pred[neg, j]).float().mean()).item())
    return float(np.mean(scores)) if scores else float("nan")


def readings(head_logits: torch.Tensor, targets: torch.Tensor, grid: int) -> dict:
    """Held-out balanced accuracies: per cell, and for the whole canvas (a label anywhere: max over cells)."""
    k = len(COLOURS) * len(SHAPES)
    cells_l, cells_t = head_logits.reshape(-1, N_LABELS), targets.reshape(-1, N_LABELS)
    img_l = head_logits.reshape(-1, grid * grid, N_LABELS).amax(1)
    img_t = targets.reshape(-1, grid * grid, N_LABELS).amax(1)
    return {"cell_colour_shape": balanced_accuracy(cells_l[:, :k], cells_t[:, :k]),
            "canvas_colour": balanced_accuracy(img_l[:, k:k + len(COLOURS)], img_t[:, k:k + len(COLOURS)]),
            "canvas_shape": balanced_accuracy(img_l[:, -len(SHAPES):], img_t[:, -len(SHAPES):]),
            "canvas_colour_shape": balanced_accuracy(img_l[:, :k], img_t[:, :k]),
            # "a star anywhere" read through the colour+shape labels (a shape is an OR over colours, which the
            # shape-only labels' linear readout need not learn; their canvas reading stayed near 0.53)
            "canvas_shape_via_pairs": balanced_accuracy(img_l[:, :k].reshape(-1, len(COLOURS), len(SHAPES)).amax(1),
                                                        img_t[:, -len(SHAPES):])}


class WordHead(torch.nn.Module):
    """Per-token logits over ``N_LABELS``: colour+shape pairs through a free linear map; colours and shapes as the
    token's dot product with the (frozen) input embeddings of their words, times a learned temperature."""

    def __init__(self, width: int, word_embeddings: torch.Tensor):
        super().__init__()
        self.pairs = torch.nn.Linear(width, len(COLOURS) * len(SHAPES))
        self.register_buffer("words", word_embeddings / word_embeddings.norm(dim=-1, keepdim=True))
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))
        self.bias = torch.nn.Parameter(torch.zeros(len(word_embeddings)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pairs(h), self.temperature * h @ self.words.T + self.bias], dim=-1)


def word_ids(tokenizer) -> list[int]:
    """The token of each colour and shape name as prompts spell it (after a space); one token each or an error."""
    ids = []
    for w in [*COLOURS, *SHAPES]:
        got = tokenizer(" " + w, add_special_tokens=False).input_ids
        if len(got) != 1:
            raise ValueError(f"--word-head needs one token per colour and shape word; {w!r} is {len(got)} tokens")
        ids.append(got[0])
    return ids


def pretrain(init: Path, out: Path, sources: list[Path], *, steps: int, batch_size: int, lr: float, images: int,
             heldout: int, seed: int, eval_every: int = 500, probe: bool = False, word_head: bool = False) -> dict:
    """Train the tower and a per-cell head; ``probe``: train the head only (a linear probe of the tower as it is)
    and write ``OUT/probe.json`` instead of a model folder."""
    torch.manual_seed(seed)
    model, processor = load_qwen3_vl(str(init), torch_dtype="float32", device="cpu")
    settings = json.loads((init / CONTROLLER_SETTINGS).read_text())
    words = word_ids(processor.tokenizer) if word_head else None  # before minutes of reading canvases
    size = int(settings["image_size"])
    vision = model.model.visual
    unit = vision.config.patch_size * vision.config.spatial_merge_size
    if size % unit:
        raise ValueError(f"image_size {size} is not a multiple of {unit} (patch x merge)")
    grid = size // unit
    pics, targets = read_images(sources, images + heldout, size, grid, seed)
    if len(pics) < heldout + batch_size:
        raise ValueError(f"found {len(pics)} canvases under {', '.join(map(str, sources))}; "
                         f"need at least --heldout + --batch-size = {heldout + batch_size}")
    targets = torch.from_numpy(targets)
    train_idx, held_idx = list(range(heldout, len(pics))), list(range(heldout))

    def tokens(idx: list[int], deepstack: bool = False):
        enc = processor.image_processor(images=[pics[i] for i in idx], return_tensors="pt")
        grids = enc["image_grid_thw"]
        side = grid * vision.config.spatial_merge_size
        if not bool((grids == torch.tensor([1, side, side])).all()):
            raise ValueError(f"the processor patchified a {size}px canvas into {grids[0].tolist()}, "
                             f"not {grid} x {grid} tokens (processor size and image_size disagree)")
        got = vision(enc["pixel_values"], grid_thw=grids, return_dict=True)
        return [got.pooler_output, *got.deepstack_features] if deepstack else got.pooler_output

    width = model.config.vision_config.out_hidden_size
    if word_head:
        embed = model.get_input_embeddings().weight.detach()
        head = WordHead(width, embed[words].clone())
        text_norm = float(embed.norm(dim=-1).mean())
    else:
        head = torch.nn.Linear(width, N_LABELS)
    # positives are rare (a few objects in grid*grid cells): weigh them up to the negatives' share
    pos = targets[heldout:].reshape(-1, N_LABELS).mean(0).clamp(min=1e-4)
    pos_weight = ((1 - pos) / pos).clamp(max=50.0)
    for p in model.parameters():
        p.requires_grad_(False)
    params = ([] if probe else list(vision.parameters())) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)

    def evaluate() -> dict:
        vision.eval()
        with torch.no_grad():
            toks = torch.cat([tokens(held_idx[i:i + 128]) for i in range(0, len(held_idx), 128)])
            logits = head(toks)
        vision.train(not probe)
        return {**readings(logits, targets[held_idx], grid), "token_norm": float(toks.norm(dim=-1).mean())}

    curve = [{"step": 0, **evaluate()}]
    print(json.dumps(curve[-1]), flush=True)
    vision.train(not probe)
    for step in range(1, steps + 1):
        idx = rng.sample(train_idx, batch_size)
        outs = tokens(idx, deepstack=word_head and not probe)
        outs = outs if isinstance(outs, list) else [outs]
        loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(
            head(h), targets[idx].reshape(-1, N_LABELS), pos_weight=pos_weight) for h in outs) / len(outs)
        if word_head and not probe:  # tokens the size of word embeddings, as the language model's inputs are
            loss = loss + 0.1 * sum(((h.norm(dim=-1) - text_norm).relu() ** 2).mean() for h in outs) / len(outs)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "loss": round(loss.item(), 4), **evaluate()})
            print(json.dumps(curve[-1]), flush=True)
    vision.eval()
    record = {"sources": [str(s) for s in sources], "images": len(train_idx), "heldout": heldout, "steps": steps,
              "batch_size": batch_size, "learning_rate": lr, "seed": seed, "grid": grid, "word_head": word_head,
              "curve": curve}
    if probe:
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps({"init": str(init), "probe": record}, indent=2) + "\n")
        return curve[-1]
    write_vlm_folder(out, model, processor, settings, {"init": init_record(init), "pretrain_vision": record})
    return curve[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("init", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=16000, help="training canvases (the first --heldout are held out)")
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--word-head", action="store_true",
                   help="read colours and shapes through the language model's embeddings of their words")
    p.add_argument("--probe", action="store_true",
                   help="freeze the tower and train only the head: a linear probe; writes OUT_DIR/probe.json")
    a = p.parse_args()
    if min(a.steps, a.batch_size, a.images, a.heldout, a.eval_every) < 1 or not a.learning_rate > 0:
        p.error("--steps, --batch-size, --images, --heldout and --eval-every must be >= 1, --learning-rate > 0")
    if not (a.init / "config.json").is_file() or not (a.init / CONTROLLER_SETTINGS).is_file():
        p.error(f"{a.init} is not a clvr-mini-vlm folder (needs config.json and {CONTROLLER_SETTINGS})")
    if a.out.resolve() == a.init.resolve():
        p.error("OUT_DIR must differ from INIT_DIR (the init is read while the output is written)")
    missing = [str(s) for s in a.sources if not s.is_dir()]
    if missing:
        p.error(f"not a folder: {', '.join(missing)}")
    try:
        final = pretrain(a.init, a.out, a.sources, steps=a.steps, batch_size=a.batch_size, lr=a.learning_rate,
                         images=a.images, heldout=a.heldout, seed=a.seed, eval_every=a.eval_every, probe=a.probe,
                         word_head=a.word_head)
    except ValueError as e:  # nothing is written before training ends
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(final))


if __name__ == "__main__":
    main()
