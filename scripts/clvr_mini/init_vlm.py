"""Stage 0 of clvr-mini-vlm: the random-init Qwen3-VL folder that `clvr train sft-vlm` trains from scratch.

The real classes (``Qwen3VLForConditionalGeneration``, ``Qwen3VLProcessor`` with Qwen3-VL's chat template)
at toy size, with clvr-mini's word-level vocabulary inside the byte-level Qwen2 tokenizer
(:func:`init_model.word_level_tokenizer`): every word, number and JSON piece the controller's
conversations use is one token (unknown text falls back to bytes). The vocabulary is read from the
conversations the renderer makes of recorded calls, so it covers the system prompts, schemas, user texts
and the teacher's replies. The image processor keeps at most ``image_size``² pixels, and
``clvr_controller.json`` tells the ``qwen3-vl`` controller to downscale canvases to ``image_size``.

Usage: python scripts/clvr_mini/init_vlm.py OUT_DIR --data SYNTH_DIR [--data ...] [--image-size 128 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from init_model import word_level_tokenizer  # noqa: E402

from clvr_agent.tools.conversation import RenderOptions, training_conversation  # noqa: E402
from clvr_agent.tools.tiny_vlm import QWEN3_VL_CHAT_TEMPLATE, build_tiny_processor, build_tiny_qwen3_vl  # noqa: E402
from clvr_agent.training.sft_vlm import load_calls  # noqa: E402


def _texts(conv: list[dict]) -> list[str]:
    out = []
    for m in conv:
        content = m["content"]
        out += [content] if isinstance(content, str) else [b["text"] for b in content if b["type"] == "text"]
    return out


def build(out: Path, data: list[Path], *, image_size: int, sample: int, seed: int, history_token_budget: int,
          history_images: int, max_new_tokens: int, **sizes) -> dict:
    calls = [c for d in data for c in load_calls(d)]
    if not calls:
        raise SystemExit(f"no calls-*.jsonl under {data}: run `clvr synth --record-calls` first")
    opts = RenderOptions(image_size=image_size, history_token_budget=history_token_budget,
                         history_images=history_images)
    picked = random.Random(seed).sample(calls, min(sample, len(calls)))
    texts = [t for c in picked for t in _texts(training_conversation(c, opts))]
    tok = word_level_tokenizer(texts + ["system\n", "<think>\n", "</think>\n\n"], max_length=32768)
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    processor = build_tiny_processor(tokenizer=tok, max_pixels=image_size * image_size)
    model, processor = build_tiny_qwen3_vl(seed, processor, **sizes)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "clvr_controller.json").write_text(json.dumps(
        {"image_size": image_size, "history_token_budget": history_token_budget, "history_images": history_images,
         "max_new_tokens": max_new_tokens}, indent=2) + "\n")
    lengths = []
    for c in picked[:200]:
        conv = training_conversation(c, opts)
        text = processor.apply_chat_template(conv, tokenize=False)
        n_images = sum(1 for m in conv if not isinstance(m["content"], str)
                       for b in m["content"] if b["type"] == "image")
        lengths.append(len(tok(text).input_ids) + n_images * (image_size // 32) ** 2)
    info = {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "calls": len(calls),
            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths), "image_size": image_size,
            "sizes": sizes}
    (out / "clvr_mini_vlm_init.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, action="append", required=True, help="synth folder(s) with calls-*.jsonl")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--sample", type=int, default=4000, help="calls whose conversations form the vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--history-token-budget", type=int, default=2048, help="must match the sft-vlm run's")
    p.add_argument("--history-images", type=int, default=2, help="must match the sft-vlm run's")
    p.add_argument("--max-new-tokens", type=int, default=400)
    a = p.parse_args()
    info = build(a.out, a.data, image_size=a.image_size, sample=a.sample, seed=a.seed,
                 history_token_budget=a.history_token_budget, history_images=a.history_images,
                 max_new_tokens=a.max_new_tokens, hidden=a.hidden, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, intermediate=a.intermediate, vision_hidden=a.vision_hidden,
                 vision_depth=a.vision_depth, vision_positions=(a.image_size // 16) ** 2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
