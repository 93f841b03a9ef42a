"""Stage 0 of the clvr-mini recipe: the random-init FLUX.2 [klein] folder every later stage trains.

The real classes from ``tools/tiny.py`` at clvr-mini's sizes, with two changes for a tiny model:

* a word-level vocabulary inside the same byte-level Qwen2 tokenizer: BPE merges that build every
  ShapeWorld word (and the chat-template words) into one token, so "a photo of a red circle" is 7
  tokens instead of 24 bytes. It is an ordinary ``tokenizer.json`` (vocab + merges), so it saves and
  loads with the folder and still has the chat template and pad token the pipeline needs; unknown
  text falls back to bytes;
* ``FlowMatchEulerDiscreteScheduler(shift=1, use_dynamic_shifting=False)``: klein's dynamic shift
  (~5.9 at 64 tokens) leaves too few low-noise steps for a 64-token canvas.

Usage: python scripts/clvr_mini/init_model.py OUT_DIR --data DATA.jsonl [--size 64 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clvr_agent.tools.tiny import QWEN_SPECIAL_TOKENS, build_tiny_flux2_klein, build_tokenizer

TEMPLATE_TEXT = ("user\n", "assistant\n", "<think>\n\n</think>\n\n", "\n")


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
    return word


def word_level_tokenizer(texts: list[str], max_length: int):
    """``build_tokenizer()`` plus merges that make each pre-token seen in ``texts`` a single token.

    Merges are added word by word, each joining the pieces the merges so far leave, left to right; a
    later merge never outranks an earlier one, so every listed word still ends as one token.
    """
    from transformers import Qwen2Tokenizer

    base = build_tokenizer()
    pre = base.backend_tokenizer.pre_tokenizer
    words: dict[str, int] = {}
    for text in list(texts) + list(TEMPLATE_TEXT):
        for piece, _ in pre.pre_tokenize_str(text):
            words[piece] = words.get(piece, 0) + 1
    vocab = {tok: i for tok, i in base.get_vocab().items() if i < base.vocab_size}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(words, key=lambda w: (-words[w], w)):
        pieces = _bpe(list(word), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.chat_template = base.chat_template
    tok.model_max_length = max_length
    return tok


def build(out: Path, texts: list[str], *, size: int, max_length: int, seed: int, **sizes) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = word_level_tokenizer(texts, max_length)
    pipe = build_tiny_flux2_klein(distilled=False, seed=seed, max_sequence_length=max_length, **sizes)
    te_cfg = pipe.text_encoder.config.to_dict()
    te_cfg.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in te_cfg.items() if k not in ("architectures",)})).eval()
    pipe.vae.register_to_config(sample_size=size)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=pipe.vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=pipe.transformer, is_distilled=False)
    pipe.save_pretrained(out, safe_serialization=True)
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("transformer", "vae", "text_encoder")}
    lengths = [len(tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)).input_ids) for t in texts]
    info = {"params": counts, "vocab": len(tok), "max_prompt_tokens": max(lengths),
            "mean_prompt_tokens": sum(lengths) / len(lengths), "size": size, "sizes": sizes}
    (out / "clvr_mini_init.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, action="append", required=True, help="JSONL(s) whose prompts form the vocabulary")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--single-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=32)
    p.add_argument("--vae-channels", type=str, default="16,32,32")
    p.add_argument("--latent-channels", type=int, default=8)
    a = p.parse_args()
    texts = [json.loads(ln)["prompt"] for path in a.data for ln in path.read_text().splitlines() if ln.strip()]
    info = build(a.out, texts, size=a.size, max_length=a.max_length, seed=a.seed, layers=a.layers,
                 single_layers=a.single_layers, heads=a.heads, head_dim=a.head_dim, text_hidden=a.text_hidden,
                 vae_channels=tuple(int(c) for c in a.vae_channels.split(",")), latent_channels=a.latent_channels)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
