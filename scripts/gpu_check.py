"""One-shot GPU check: the full-size FLUX.2 [klein] 4B architecture with random weights, through the
real executor, at 1024²: distilled 4 steps vs base 28 CFG steps (and a 1-reference edit).

    python scripts/gpu_check.py [OUT.json]       # default: $OUT/gpu_check.json, else ./gpu_check.json
    python scripts/gpu_check.py --dry-run        # same code path, tiny sizes, CPU, 64²

Writes timings (seconds per call and per transformer pass), NFE and peak CUDA memory as JSON.

Architecture assumption (diffusers has no klein-4B config in source; these are the values of
black-forest-labs/FLUX.2-klein-4B as published and as re-implementations such as mflux use):
transformer 5 double + 20 single blocks, 24 heads × 128 = 3072 wide, 128 input channels
(32 latent × 2×2), joint_attention_dim 7680 = 3 × 2560; text encoder Qwen3-4B (36 layers, hidden
2560, 32 heads / 8 KV heads, head_dim 128, intermediate 9728, vocab 151936); VAE = AutoencoderKLFlux2
defaults (32 latent channels, 8× downsampling). Random weights: the images are noise, the costs are real.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    "size": 1024,
    "base_steps": 28,
}

# The same builder and calls at toy sizes, for checking the script without an accelerator.
DRY_RUN = {
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
    "size": 64,
    "base_steps": 3,
}


def build_pipeline(spec: dict, device: str, dtype):
    """Random-weight klein pipeline, initialised directly on ``device`` (no host copy of 8B weights)."""
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


def timed_call(executor, request, references, device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = executor.generate(request, references)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 4),
        "nfe": out.nfe,
        "seconds_per_nfe": round(seconds / out.nfe, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "size": list(out.image.size),
        "info": out.info,
    }


def run(dry_run: bool = False) -> dict:
    """Build, warm up, then time distilled / edit / base-CFG calls; returns the JSON-ready report."""
    import torch
    from diffusers import Flux2KleinPipeline

    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.types import ExecutorRequest

    spec = DRY_RUN if dry_run else KLEIN_4B
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (use --dry-run to check the script on CPU)")
    dtype = torch.float32 if dry_run else torch.bfloat16
    t0 = time.perf_counter()
    pipe = build_pipeline(spec, device, dtype)
    build_s = time.perf_counter() - t0
    distilled = Flux2KleinExecutor.from_pipeline(pipe)
    base_pipe = Flux2KleinPipeline(**pipe.components, is_distilled=False)  # same modules, CFG defaults
    base = Flux2KleinExecutor.from_pipeline(base_pipe)

    size = spec["size"]
    prompt = "a red cube on a blue sphere, studio light"
    req = ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt, seed=0, height=size, width=size)
    distilled.generate(req.model_copy(update={"steps": 1}), [])  # warm-up: kernels, allocator
    results = {"distilled_4": timed_call(distilled, req, [], device)}
    canvas = distilled.generate(req, []).image
    edit = req.model_copy(update={"mode": "edit", "instruction": "make the cube green"})
    results["distilled_4_edit_1ref"] = timed_call(distilled, edit, [canvas], device)
    results[f"base_{spec['base_steps']}_cfg"] = timed_call(
        base, req.model_copy(update={"steps": spec["base_steps"], "guidance": 4.0}), [], device
    )
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "text_encoder", "vae")}
    report = {
        "check": "gpu" if not dry_run else "gpu-dry-run",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": size,
        "parameters": params,
        "build_seconds": round(build_s, 2),
        "torch": torch.__version__,
        "results": results,
    }
    d, b = results["distilled_4"], results[f"base_{spec['base_steps']}_cfg"]
    report["base_over_distilled_seconds"] = round(b["seconds"] / d["seconds"], 2)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, not the GPU")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    report = run(dry_run=args.dry_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    for name, r in report["results"].items():
        print(f"{name}: {r['seconds']:.3f} s, NFE {r['nfe']}, peak {r['peak_memory_gib']} GiB")
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
