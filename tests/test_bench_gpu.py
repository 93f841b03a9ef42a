"""``clvr bench gpu``: the dry run builds every model from configs on CPU and runs the whole plan; the
full-size configs have the published parameter counts (built on the meta device, no memory)."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clvr_agent.eval import bench_gpu


@pytest.mark.slow
def test_dry_run_builds_every_model_and_runs_the_plan(tmp_path):
    from clvr_agent.cli import app

    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--dry-run", "--json", str(out)])
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in bench_gpu.plan(bench_gpu.DRY_RUN)]
    assert all(name in result.stdout for name in names)  # the plan is printed
    report = json.loads(out.read_text())
    assert report["check"] == "gpu-dry-run" and [r["name"] for r in report["plan"]] == names
    calls = report["klein"]["calls"]
    assert set(calls) == {f"{m}_{k}ref" for m in ("distilled", "base", "kv") for k in (0, 1, 3)}
    for k in (0, 1, 3):
        assert calls[f"distilled_{k}ref"]["nfe"] == 4 and calls[f"distilled_{k}ref"]["pipeline"] == "Flux2KleinPipeline"
        assert calls[f"base_{k}ref"]["nfe"] == 2 * 3 and calls[f"base_{k}ref"]["cfg"]  # 3 toy base steps × CFG
        assert calls[f"kv_{k}ref"]["nfe"] == 4 and calls[f"kv_{k}ref"]["pipeline"] == "Flux2KleinKVPipeline"
        assert calls[f"base_{k}ref"]["references"] == k
    vlm = report["vlm"]
    assert vlm["new_tokens"] == 16 and vlm["image_tokens"] == 4  # a 64² canvas: 2×2 merged patches
    sft = report["sft"]
    assert sft["steps"] == 10 and len(sft["step_seconds"]) == 10 and all(math.isfinite(x) for x in sft["losses"])
    assert sft["trainable_parameters"] > 0 and report["total_s"] > 0


def test_plan_is_the_issue_s_full_size_check():
    rows = bench_gpu.plan(bench_gpu.FULL)
    assert len(rows) == 11 and bench_gpu.FULL["size"] == 1024 and bench_gpu.FULL["base_steps"] == 28
    assert "256 new tokens" in rows[-2]["runs"] and "LoRA 64" in rows[-1]["runs"] and "10 steps at 1024²" in rows[-1]["runs"]


def test_full_size_configs_have_the_published_parameter_counts():
    """Qwen3-VL-8B-Instruct 8.77B, Qwen3-4B (klein-4B's text encoder) 4.02B, klein-4B transformer 3.88B."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from clvr_agent.tools.tiny_vlm import build_tiny_processor

    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
    vlm = bench_gpu.build_vlm(bench_gpu.QWEN3_VL_8B, "meta", torch.bfloat16, build_tiny_processor(max_pixels=1024**2))
    assert round(count(vlm), 2) == 8.77
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**bench_gpu.KLEIN_4B["transformer"])
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**bench_gpu.KLEIN_4B["text_encoder"]))
    assert round(count(text_encoder), 2) == 4.02 and round(count(transformer), 2) == 3.88


def test_script_is_a_thin_wrapper_over_the_package():
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    assert runpy.run_path(str(script))["main"] is bench_gpu.main  # works from a wheel: the logic is in the package


def test_without_cuda_the_full_check_is_skipped_not_failed():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from clvr_agent.cli import app

    result = CliRunner().invoke(app, ["bench", "gpu"])
    assert result.exit_code == 0 and "no CUDA device" in result.stdout
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        bench_gpu.run()
