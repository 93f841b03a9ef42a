"""`clvr bench gpu`: what a lent accelerator should answer in ≤ 9 minutes, built from configs (no hub).

Three sections, random weights at the published architectures (the images are noise, the costs real):

- **klein**: FLUX.2 [klein] 4B at 1024² through the real executor — 4-step distilled vs 28-step CFG
  base, each with 0, 1 and 3 reference canvases, and the plain vs the KV pipeline (reference tokens cached).
- **vlm**: one Qwen3-VL-8B verify call through the real chat model: one 1024² canvas, exactly 256 new tokens.
- **sft**: 10 optimizer steps of ``sft-diffusion`` at 1024² with LoRA rank 64 (one reference per example).

Each call records seconds and peak CUDA memory; everything goes into one JSON. ``--dry-run`` runs the
same code on CPU at toy sizes (checks the script, not the accelerator).

Where the full-size configs come from (the hub cannot be reached from a lent machine):
- klein-4B: ``black-forest-labs/FLUX.2-klein-4B`` ``transformer/config.json`` and ``text_encoder/config.json``
  as published (5 double + 20 single blocks, 24 × 128 heads, in_channels 128, joint_attention_dim 7680;
  text encoder Qwen3-4B: 36 layers, hidden 2560, 32/8 heads, intermediate 9728, vocab 151936); the same
  values mflux and other re-implementations use, and ``/work/shared/reference/ecosystem_api.md``
  (joint_attention_dim = 3 × 2560). VAE: ``AutoencoderKLFlux2`` defaults (the FLUX.2 VAE).
- Qwen3-VL-8B: ``Qwen/Qwen3-VL-8B-Instruct`` ``config.json``: text 36 layers, hidden 4096, intermediate
  12288, 32/8 heads, head_dim 128, vocab 151936, rope θ 5e6, interleaved M-RoPE sections [24, 20, 20],
  untied embeddings; vision 27 blocks, hidden 1152, intermediate 4304, 16 heads, patch 16, 2×2 merge,
  temporal patch 2, 2304 position embeddings, out 4096, DeepStack layers [8, 16, 24] (8.77B parameters).
  The byte-level test tokenizer stands in for Qwen's (its ids fit the 151936 vocabulary).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

KLEIN_4B = {
    "transformer": dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False,
    ),
    "text_encoder": dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "vae": dict(),  # AutoencoderKLFlux2 defaults are the FLUX.2 VAE
}
QWEN3_VL_8B = {
    "text": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                         "rope_theta": 5000000},
    ),
    "vision": dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
    ),
    "tie_word_embeddings": False,
}
FULL = {
    "klein": KLEIN_4B, "vlm": QWEN3_VL_8B, "size": 1024, "distilled_steps": 4, "base_steps": 28, "guidance": 4.0,
    "references": (0, 1, 3), "new_tokens": 256, "sft_steps": 10, "lora_rank": 64,
}
# The same builders and calls at toy sizes, for checking the script without an accelerator.
DRY_RUN = {
    "klein": {
        "transformer": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        ),
        "text_encoder": dict(
            vocab_size=263, hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
        ),
        "vae": dict(
            block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=1,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
    },
    "vlm": {
        "text": dict(
            vocab_size=263, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, hidden_act="silu", max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                             "rope_theta": 10000},
        ),
        "vision": dict(
            depth=2, hidden_size=32, intermediate_size=32, num_heads=4, in_channels=3, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
        ),
        "tie_word_embeddings": True,
    },
    "size": 64, "distilled_steps": 4, "base_steps": 3, "guidance": 4.0, "references": (0, 1, 3), "new_tokens": 16,
    "sft_steps": 10, "lora_rank": 4,
}
BUDGET_S = 540.0  # 9 minutes: calls that would start later are recorded as skipped
PROMPT = "a red cube on a blue sphere, a green cone to the left, studio light"


def plan(spec: dict) -> list[dict]:
    """Every timed call, in order: section, name and what it runs."""
    s, rows = spec["size"], []
    for mode, steps in (("distilled", spec["distilled_steps"]), ("base", spec["base_steps"])):
        for k in spec["references"]:
            cfg = "no CFG" if mode == "distilled" else f"CFG {spec['guidance']:g}"
            rows.append({"section": "klein", "name": f"{mode}_{k}ref", "runs": f"{steps} steps, {cfg}, {k} refs, {s}²"})
    for k in spec["references"]:
        rows.append({"section": "klein", "name": f"kv_{k}ref", "runs": f"KV pipeline, {spec['distilled_steps']} steps, {k} refs, {s}²"})
    rows.append({"section": "vlm", "name": "verify", "runs": f"one {s}² canvas, {spec['new_tokens']} new tokens"})
    rows.append({"section": "sft", "name": "sft_diffusion",
                 "runs": f"{spec['sft_steps']} steps at {s}², LoRA {spec['lora_rank']}, 1 reference"})
    return rows


def run(dry_run: bool = False, budget_s: float = BUDGET_S) -> dict:
    """Build each model from its config, time every call of ``plan``; the JSON-ready report."""
    import diffusers
    import torch
    import transformers

    spec = DRY_RUN if dry_run else FULL
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("clvr bench gpu needs a CUDA device (--dry-run checks the script on CPU)")
    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    clock = _Clock(budget_s, device)
    report = {
        "check": "gpu-dry-run" if dry_run else "gpu", "device": torch.cuda.get_device_name() if not dry_run else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "resolution": spec["size"], "budget_s": budget_s,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "plan": plan(spec),
    }
    with tempfile.TemporaryDirectory(prefix="clvr-bench-gpu-") as tmp:
        pipe, report["klein"] = bench_klein(spec, device, dtype, clock)
        report["sft"] = bench_sft(pipe, spec, Path(tmp), clock)
        del pipe
        _free(device)
        report["vlm"] = bench_vlm(spec, device, dtype, clock)
    report["total_s"] = round(clock.elapsed(), 2)
    return report


class _Clock:
    """Elapsed time of the whole check, and per-call timing with peak memory."""

    def __init__(self, budget_s: float, device: str):
        self.t0, self.budget_s, self.cuda = time.perf_counter(), budget_s, device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.budget_s

    def timed(self, fn):
        """(result, {"seconds", "peak_memory_gib"}) of ``fn()``, synchronised on CUDA."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None
        return out, {"seconds": round(seconds, 4), "peak_memory_gib": peak}


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def build_klein(spec: dict, device: str, dtype):
    """Random-weight klein pipeline, initialised on ``device`` (distilled: 4 steps, no CFG)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from clvr_agent.tools.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # byte-level; its ids fit any vocab ≥ 263
    torch.manual_seed(0)
    with torch.device(device):
        transformer = Flux2Transformer2DModel(**spec["transformer"])
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(**spec["text_encoder"], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        )
        vae = AutoencoderKLFlux2(**spec["vae"])
    for module in (transformer, text_encoder, vae):
        module.to(dtype).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer, is_distilled=True,
    )


def bench_klein(spec: dict, device: str, dtype, clock: _Clock):
    """Distilled / base-CFG / KV calls with 0, 1, 3 references; returns (the distilled pipeline, section)."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline
    from PIL import Image

    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.types import ExecutorRequest

    pipe, build = clock.timed(lambda: build_klein(spec["klein"], device, dtype))
    size = spec["size"]
    distilled = Flux2KleinExecutor.from_pipeline(pipe)
    base = Flux2KleinExecutor.from_pipeline(Flux2KleinPipeline(**pipe.components, is_distilled=False))  # same modules
    req = ExecutorRequest(mode="generate", instruction=PROMPT, accumulated_prompt=PROMPT, seed=0, height=size, width=size)
    distilled.generate(req.model_copy(update={"steps": 1}), [])  # warm-up: kernels, allocator
    refs = [Image.effect_noise((size, size), 64 + 32 * i).convert("RGB") for i in range(max(spec["references"]))]
    section = {
        "build": build, "parameters": {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("transformer", "text_encoder", "vae")},
        "calls": {},
    }
    calls = section["calls"]

    def call(name: str, executor, k: int, **update) -> None:
        if clock.over():
            calls[name] = {"skipped": f"over the {clock.budget_s:.0f} s budget"}
            return
        r = req.model_copy(update={"mode": "edit" if k else "generate", **update})
        out, t = clock.timed(lambda: executor.generate(r, refs[:k]))
        calls[name] = {**t, "nfe": out.nfe, "seconds_per_nfe": round(t["seconds"] / out.nfe, 4), "references": k,
                       "steps": out.info["steps"], "cfg": out.info["cfg"], "pipeline": out.info["pipeline"]}

    for k in spec["references"]:
        call(f"distilled_{k}ref", distilled, k)
    for k in spec["references"]:
        call(f"base_{k}ref", base, k, steps=spec["base_steps"], guidance=spec["guidance"])
    # The KV pipeline swaps the transformer's attention processors: keep the plain ones to restore after.
    processors = dict(pipe.transformer.attn_processors)
    kv = Flux2KleinExecutor.from_pipeline(Flux2KleinKVPipeline(**pipe.components))
    for k in spec["references"]:
        call(f"kv_{k}ref", kv, k)
    pipe.transformer.set_attn_processor(processors)
    for k in spec["references"]:
        plain, cached = calls[f"distilled_{k}ref"], calls[f"kv_{k}ref"]
        if "seconds" in plain and "seconds" in cached:
            section[f"plain_over_kv_{k}ref"] = round(plain["seconds"] / cached["seconds"], 3)
    d, b = calls["distilled_0ref"], calls["base_0ref"]
    if "seconds" in d and "seconds" in b:
        section["base_over_distilled_0ref"] = round(b["seconds"] / d["seconds"], 2)
    return pipe, section


def bench_sft(pipe, spec: dict, tmp: Path, clock: _Clock) -> dict:
    """``sft_steps`` optimizer steps of the real SFT trainer with LoRA on ``pipe``; per-step seconds."""
    import torch
    from PIL import Image
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from clvr_agent.training.diffusion_configs import SFTDiffusionConfig
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer, SFTExample

    if clock.over():
        return {"skipped": f"over the {clock.budget_s:.0f} s budget"}
    size, data = spec["size"], tmp / "sft-data"
    data.mkdir()
    examples = []
    for i in range(2):
        paths = [data / f"{i}-{j}.png" for j in ("ref", "target")]
        for j, p in enumerate(paths):
            Image.effect_noise((size, size), 40 + 20 * i + 10 * j).convert("RGB").save(p)
        examples.append(SFTExample(PROMPT, [str(paths[0])], str(paths[1])))
    cuda = clock.cuda
    cfg = SFTDiffusionConfig(
        output_dir=str(tmp / "sft"), max_steps=spec["sft_steps"], batch_size=1, lora_rank=spec["lora_rank"],
        height=size, width=size, set_bn_stats=False, mixed_precision="bf16" if cuda else "no",
        checkpoint_every=0, log_every=0,
    )
    stamps: list[float] = []

    def stamp(optimizer, args, kwargs) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    hook = register_optimizer_step_post_hook(stamp)  # every optimizer, whatever wraps it
    try:
        trainer = SFTDiffusionTrainer(pipe, cfg, SFTDiffusionDataset(examples))
        start = [0.0]

        def train():
            if cuda:
                torch.cuda.synchronize()
            start[0] = time.perf_counter()
            return trainer.train()

        history, t = clock.timed(train)
    finally:
        hook.remove()
    steps = [round(b - a, 4) for a, b in zip([start[0], *stamps[:-1]], stamps)]
    return {
        **t, "steps": len(stamps), "step_seconds": steps,
        "mean_step_s_after_first": round(sum(steps[1:]) / max(len(steps) - 1, 1), 4),
        "losses": [round(r["loss"], 5) for r in history], "lora_rank": spec["lora_rank"],
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "note": "seconds include the final checkpoint and the export of the diffusers folder",
    }


def build_vlm(spec: dict, device: str, dtype, processor):
    """Random-weight ``Qwen3VLForConditionalGeneration`` from ``spec`` on ``device``; special-token ids
    are the processor tokenizer's."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={**spec["text"], "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config=spec["vision"], image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=spec["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype).eval()


def bench_vlm(spec: dict, device: str, dtype, clock: _Clock) -> dict:
    """One verify call through ``Qwen3VLChatModel.reply``, held to exactly ``new_tokens`` new tokens."""
    from PIL import Image

    from clvr_agent.tools import prompts
    from clvr_agent.tools.qwen3_vl import Qwen3VLChatModel
    from clvr_agent.tools.tiny_vlm import build_tiny_processor

    if clock.over():
        return {"skipped": f"over the {clock.budget_s:.0f} s budget"}
    size, new = spec["size"], spec["new_tokens"]
    processor = build_tiny_processor(max_pixels=size * size)
    model, build = clock.timed(lambda: build_vlm(spec["vlm"], device, dtype, processor))
    model.generation_config.min_new_tokens = new  # random weights may stop at once; time all `new` tokens
    chat = Qwen3VLChatModel(model=model, processor=processor, max_new_tokens=new)
    canvas = Image.effect_noise((size, size), 64).convert("RGB")
    user = prompts.VERIFY_USER.format(
        prompt=PROMPT, constraints="c1: a red cube\nc2: a blue sphere under the cube\nc3: a green cone left of them",
        history="1. draw the scene",
    )
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": prompts.VERIFY_SYSTEM}]},
        {"role": "user", "content": [{"type": "text", "text": user}, {"type": "image", "image": canvas}]},
    ]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_tokens = len(inputs["input_ids"][0])
    image_tokens = sum(1 for i in inputs["input_ids"][0] if i == model.config.image_token_id)
    forwards: list[float] = []
    hook = model.model.language_model.register_forward_hook(lambda m, a, o: forwards.append(time.perf_counter()))
    try:
        chat.reply(conversation)  # warm-up
        forwards.clear()
        t_start = time.perf_counter()
        _, t = clock.timed(lambda: chat.reply(conversation))
    finally:
        hook.remove()
    decode_s = forwards[-1] - forwards[0] if len(forwards) > 1 else 0.0
    return {
        "build": build, **t, "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": prompt_tokens, "image_tokens": image_tokens, "new_tokens": len(forwards),
        # The byte-level stand-in tokenizer spends ~4× Qwen's tokens on English: the prefill is an upper bound.
        "text_tokenizer": "byte-level stand-in",
        "prefill_s": round(forwards[0] - t_start, 4) if forwards else None,
        "decode_tokens_per_s": round((len(forwards) - 1) / decode_s, 1) if decode_s else None,
    }


def print_plan(spec: dict) -> None:
    for row in plan(spec):
        print(f"{row['section']:6} {row['name']:16} {row['runs']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: checks the script, not the GPU")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="calls that would start later are skipped")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    print_plan(DRY_RUN if args.dry_run else FULL)
    report = run(dry_run=args.dry_run, budget_s=args.budget_s)
    write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name, r in report["klein"]["calls"].items():
        print(f"klein  {name:16} " + (f"{r['seconds']:.3f} s, NFE {r['nfe']}, peak {r['peak_memory_gib']} GiB"
                                      if "seconds" in r else r["skipped"]))
    for section in ("vlm", "sft"):
        r = report[section]
        print(f"{section:6} " + (f"{r['seconds']:.3f} s, peak {r['peak_memory_gib']} GiB" if "seconds" in r else r["skipped"]))
    print(f"total {report['total_s']:.1f} s; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
