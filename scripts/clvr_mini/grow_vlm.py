"""Grow a trained clvr-mini-vlm folder into a larger one that computes exactly the same function.

Issue 18's reading of the verify plateau is capacity: at 0.88 M parameters more verify steps cost the planner
its plans. Training a larger model from scratch costs the ~3 CPU hours the shipped one took, so this grows
the trained one instead (function-preserving growth, as in Net2Net / "bert2BERT"): every MLP gets wider
(new hidden units read the input through fresh random rows and write nothing: their output columns are
zero) and new blocks are appended to the vision tower and the language model as identities (their attention
output projection and MLP output projection are zero, so the residual stream passes through). The grown
model's logits equal the original's on every input, so training starts from the shipped planner and only
adds room. The deepstack taps stay on the original vision blocks; the final merger reads the last block.

Usage: python scripts/clvr_mini/grow_vlm.py INIT_DIR OUT_DIR [--vision-depth 4] [--vision-intermediate 256]
       [--text-layers 3] [--text-intermediate 256] [--seed 0] [--image-size 256]
``--image-size`` lets the model read larger canvases (processor pixel bound and the controller's downscaling move
together); the function is the same on images that fit both bounds, and new on larger ones.
The folder keeps INIT_DIR's processor, vocabulary and ``clvr_controller.json``; ``clvr_mini_vlm.json`` records
the growth on top of INIT_DIR's record, and the script refuses to write a folder whose logits differ.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from ship_vlm import write_vlm_folder  # noqa: E402

from clvr_agent.tools.qwen3_vl import CONTROLLER_SETTINGS, load_qwen3_vl  # noqa: E402

# parameters whose output feeds the residual stream: zero where they are new, so new units/blocks write nothing
_WRITES_RESIDUAL = re.compile(r"(attn\.proj|mlp\.linear_fc2|self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")
_VISION_BLOCK = re.compile(r"^model\.visual\.blocks\.(\d+)\.")
_TEXT_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


def grown_config(config, *, vision_depth: int, vision_intermediate: int, text_layers: int,
                 text_intermediate: int):
    """A copy of ``config`` with the new sizes; each may only grow."""
    v, t = config.vision_config, config.text_config
    for name, old, new in (("vision depth", v.depth, vision_depth),
                           ("vision intermediate", v.intermediate_size, vision_intermediate),
                           ("text layers", t.num_hidden_layers, text_layers),
                           ("text intermediate", t.intermediate_size, text_intermediate)):
        if new < old:
            raise ValueError(f"{name} can only grow: {old} -> {new}")
    out = config.__class__.from_dict(config.to_dict())
    out.vision_config.depth = vision_depth
    out.vision_config.intermediate_size = vision_intermediate
    out.text_config.num_hidden_layers = text_layers
    out.text_config.intermediate_size = text_intermediate
    if getattr(out.text_config, "layer_types", None):
        out.text_config.layer_types = [out.text_config.layer_types[0]] * text_layers
    return out


def grow_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], *, old_vision_depth: int,
               old_text_layers: int) -> dict[str, torch.Tensor]:
    """``new`` (a freshly initialised larger model's tensors) with ``old`` copied in and the growth silenced."""
    out = {}
    for name, fresh in new.items():
        t = fresh.clone()
        writes = bool(_WRITES_RESIDUAL.search(name))
        m_v, m_t = _VISION_BLOCK.match(name), _TEXT_LAYER.match(name)
        is_new_block = (m_v and int(m_v.group(1)) >= old_vision_depth) or (m_t and int(m_t.group(1)) >= old_text_layers)
        if is_new_block:
            if writes:
                t.zero_()
        elif name in old:
            src = old[name]
            if src.shape == t.shape:
                t.copy_(src)
            else:
                if src.dim() != t.dim() or any(a > b for a, b in zip(src.shape, t.shape)):
                    raise ValueError(f"{name}: cannot grow {tuple(src.shape)} into {tuple(t.shape)}")
                if writes or name.endswith(".bias"):  # new columns of an output projection read new units
                    t.zero_()
                t[tuple(slice(0, s) for s in src.shape)] = src
        else:
            raise ValueError(f"{name} is neither in {old_vision_depth}/{old_text_layers}-block model nor a new block")
        out[name] = t
    return out


def grow(init: Path, out: Path, *, vision_depth: int, vision_intermediate: int, text_layers: int | None = None,
         text_intermediate: int | None = None, seed: int = 0, image_size: int | None = None) -> dict:
    """Write the grown folder to ``out`` (built beside it, then moved in place); ValueError on bad sizes.
    ``text_layers`` / ``text_intermediate`` default to the init's."""
    from transformers import Qwen3VLForConditionalGeneration

    if out.resolve() == init.resolve():
        raise ValueError(f"{out} is the init folder: write the grown model to a new folder")
    if image_size is not None and (image_size < 32 or image_size % 32):
        raise ValueError(f"image size must be a multiple of 32 (patch 16 x merge 2), got {image_size}")
    model, processor = load_qwen3_vl(str(init), torch_dtype="float32", device="cpu")
    text_layers = text_layers or model.config.text_config.num_hidden_layers
    text_intermediate = text_intermediate or model.config.text_config.intermediate_size
    cfg = grown_config(model.config, vision_depth=vision_depth, vision_intermediate=vision_intermediate,
                       text_layers=text_layers, text_intermediate=text_intermediate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        big = Qwen3VLForConditionalGeneration(cfg)
    state = grow_state(model.state_dict(), big.state_dict(), old_vision_depth=model.config.vision_config.depth,
                       old_text_layers=model.config.text_config.num_hidden_layers)
    big.load_state_dict(state)
    big.generation_config = model.generation_config
    big.eval()
    diff = _max_logit_diff(model, big, processor, seed)
    if diff > 1e-4:
        raise SystemExit(f"the grown model's logits differ from {init}'s by {diff:.2e}: growth is not exact")
    settings = json.loads((init / CONTROLLER_SETTINGS).read_text())
    if image_size is not None and image_size != settings.get("image_size"):
        # the canvas reaches the model through the controller's downscaling to image_size and the processor's
        # pixel bound: both move together (the learned position grid is interpolated to the new patch grid)
        size = processor.image_processor.size
        processor.image_processor.size = {"longest_edge": image_size * image_size, "shortest_edge": size["shortest_edge"]}
        settings["image_size"] = image_size
    made = next((f for f in (init / "clvr_mini_vlm.json", init / "clvr_mini_vlm_init.json") if f.is_file()), None)
    sizes = {"vision_depth": vision_depth, "vision_intermediate": vision_intermediate, "text_layers": text_layers,
             "text_intermediate": text_intermediate, "image_size": settings["image_size"]}
    info = {"grown": sizes, "params": sum(p.numel() for p in big.parameters()), "max_logit_diff": diff,
            "init": json.loads(made.read_text()) if made else {"folder": str(init)},
            "note": "scripts/clvr_mini/grow_vlm.py: function-preserving growth (new units and blocks write zeros)"}
    big.config.use_cache = True
    write_vlm_folder(out, big, processor, settings, info)
    return info


def _max_logit_diff(a, b, processor, seed: int) -> float:
    """Largest logit difference of the two models on one text-and-image input."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                             {"type": "text", "text": "is the canvas satisfied"}]}]
    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        add_generation_prompt=True)
    with torch.no_grad():
        return float((a(**enc).logits - b(**enc).logits).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("init", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-intermediate", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=None, help="default: the init's")
    p.add_argument("--text-intermediate", type=int, default=None, help="default: the init's")
    p.add_argument("--seed", type=int, default=0, help="seed of the new units' random input rows")
    p.add_argument("--image-size", type=int, default=None,
                   help="canvas size the model reads (default: the init's; the logits stay equal for images that "
                        "fit both, larger canvases now keep more pixels)")
    a = p.parse_args()
    try:
        info = grow(a.init, a.out, vision_depth=a.vision_depth, vision_intermediate=a.vision_intermediate,
                    text_layers=a.text_layers, text_intermediate=a.text_intermediate, seed=a.seed,
                    image_size=a.image_size)
    except (OSError, ValueError) as e:  # no model at INIT, or sizes it cannot take
        p.error(str(e).splitlines()[0])  # exit 2, nothing written
    print(json.dumps({k: v for k, v in info.items() if k != "init"}))


if __name__ == "__main__":
    main()
