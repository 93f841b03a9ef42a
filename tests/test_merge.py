"""DSWM merge: the formula to fp32 round-off on every input layout, LoRA densification against peft,
TIES/DARE behaviour, loud mismatch errors and the report's diagnostics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clvr_agent.training import merge_io
from clvr_agent.training.merge import MergeConfig, _kth_largest_abs, merge_checkpoints

SHAPES = {"a.weight": (37, 11), "a.bias": (37,), "conv.weight": (5, 3, 3, 3), "scale": (), "z.weight": (64, 8)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force many row chunks per tensor so the streaming path is what the tests exercise."""
    monkeypatch.setattr(merge_io, "CHUNK_ELEMS", 50)


def _ckpt(seed: int, dtype=torch.float32, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _perturb(sd: dict, seed: int, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()}


def _expected(b: dict, a: dict, d: dict, la: float, ld: float) -> dict:
    out = {}
    for k, v in b.items():
        bf = v.float()
        out[k] = (bf + (la * (a[k].float() - bf) + ld * (d[k].float() - bf))).to(v.dtype)
    return out


def _load_out(out: Path) -> dict[str, torch.Tensor]:
    index = next(out.glob("*.safetensors.index.json"))
    sd = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        sd.update(load_file(out / shard))
    return sd


def _save_sharded(sd: dict, folder: Path, n: int = 2) -> None:
    folder.mkdir()
    names, wm = sorted(sd), {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in names[i::n]}
        save_file(part, folder / fname)
        wm.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_files_reproduce_formula(tmp_path, dtype):
    b, a, d = _ckpt(0, dtype), _perturb(_ckpt(0, dtype), 1), _perturb(_ckpt(0, dtype), 2)
    for name, sd in (("b", b), ("a", a), ("d", d)):
        save_file(sd, tmp_path / f"{name}.safetensors")
    cfg = MergeConfig(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "d.safetensors",
                      tmp_path / "out", lambda_align=0.7, lambda_distill=1.3, max_shard_mb=0.002)
    report = merge_checkpoints(cfg)
    got, want = _load_out(tmp_path / "out"), _expected(b, a, d, 0.7, 1.3)
    assert set(got) == set(want) and len(report["outputs"]["shards"]) > 1
    for k in want:
        assert got[k].dtype == dtype and got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["summary"]["n_tensors"] == len(SHAPES)


def test_sharded_folders_reproduce_formula(tmp_path):
    b, a, d = _ckpt(3), _perturb(_ckpt(3), 4), _perturb(_ckpt(3), 5)
    _save_sharded(b, tmp_path / "b", 2)
    _save_sharded(a, tmp_path / "a", 3)
    save_file(d, tmp_path / "d.safetensors")  # layouts may differ between inputs; names and shapes may not
    merge_checkpoints(MergeConfig(tmp_path / "b", tmp_path / "a", tmp_path / "d.safetensors", tmp_path / "out",
                                  lambda_align=1.0, lambda_distill=0.5))
    got, want = _load_out(tmp_path / "out"), _expected(b, a, d, 1.0, 0.5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def _tiny_flux():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )


def test_diffusers_folder_loads_with_from_pretrained(tmp_path, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    monkeypatch.setattr(merge_io, "CHUNK_ELEMS", 4096)  # still several chunks for the larger weights

    model = _tiny_flux()
    b = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "base")
    a, d = _perturb(b, 6, 0.05), _perturb(b, 7, 0.05)
    model.load_state_dict(a)
    model.save_pretrained(tmp_path / "aligned", max_shard_size="20KB")  # a sharded diffusers folder
    model.load_state_dict(d)
    model.save_pretrained(tmp_path / "distilled")
    assert (tmp_path / "aligned" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    merge_checkpoints(MergeConfig(tmp_path / "base", tmp_path / "aligned", tmp_path / "distilled",
                                  tmp_path / "out", lambda_align=0.8, lambda_distill=1.1, max_shard_mb=0.05))
    merged = Flux2Transformer2DModel.from_pretrained(tmp_path / "out").state_dict()
    want = _expected(b, a, d, 0.8, 1.1)
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(10, 10) for _ in range(2)])
        self.out = torch.nn.Linear(10, 6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_delta_equals_peft_merge_and_unload(tmp_path, use_rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _Tiny()
    b = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(b, tmp_path / "b.safetensors")
    d = _perturb(b, 8)
    save_file(d, tmp_path / "d.safetensors")
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "blocks.0", "out"], init_lora_weights=False,
                      rank_pattern={"blocks.0": 2}, alpha_pattern={"out": 3}, use_rslora=use_rslora)
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(tmp_path / "lora")
    peft_merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert not torch.equal(peft_merged["out.weight"], b["out.weight"])

    merge_checkpoints(MergeConfig(tmp_path / "b.safetensors", tmp_path / "lora", tmp_path / "d.safetensors",
                                  tmp_path / "out", lambda_align=0.6, lambda_distill=1.0))
    got, want = _load_out(tmp_path / "out"), _expected(b, peft_merged, d, 0.6, 1.0)
    for k in want:  # untouched tensors (biases, blocks.1) get only the distilled delta
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_ties_trims_elects_and_averages(tmp_path):
    base = {"w": torch.zeros(2, 4)}
    tau_a = torch.tensor([[4.0, -3.0, 1.0, 0.5], [2.0, 2.0, -0.2, 0.0]])
    tau_d = torch.tensor([[-1.0, -2.0, 3.0, 0.1], [-5.0, 1.5, 0.0, 0.0]])
    save_file(base, tmp_path / "b.safetensors")
    save_file({"w": tau_a}, tmp_path / "a.safetensors")
    save_file({"w": tau_d}, tmp_path / "d.safetensors")
    merge_checkpoints(MergeConfig(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "d.safetensors",
                                  tmp_path / "out", method="ties", ties_density=0.5))
    # top 4 of 8 per delta: a keeps {4, -3, 2, 2}, d keeps {-5, 3, -2, 1.5}; γ = sign of the sum;
    # (1, 0): a=+2 loses to d=-5; both agree at (0, 1) and (1, 1) and are averaged
    want = torch.tensor([[4.0, (-3.0 - 2.0) / 2, 3.0, 0.0], [-5.0, (2.0 + 1.5) / 2, 0.0, 0.0]])
    torch.testing.assert_close(_load_out(tmp_path / "out")["w"], want)


def test_kth_largest_abs_is_exact_over_chunks():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    x[::7] = 0.0
    chunks = lambda: iter(x.split(300))  # noqa: E731
    for k in (1, 137, 999, 1000):
        assert _kth_largest_abs(chunks, k) == x.abs().topk(k).values[-1].item()
    assert _kth_largest_abs(chunks, 0) == math.inf


def test_dare_drops_with_p_rescales_and_is_seeded(tmp_path):
    b = {"w": torch.randn(100, 200)}
    a = {"w": b["w"] + 1.0}  # τa = 1 everywhere, so the merged delta shows the mask directly
    save_file(b, tmp_path / "b.safetensors")
    save_file(a, tmp_path / "a.safetensors")

    def run(name: str, seed: int) -> torch.Tensor:
        merge_checkpoints(MergeConfig(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                      tmp_path / name, method="dare", dare_drop=0.75, seed=seed))
        return _load_out(tmp_path / name)["w"] - b["w"]

    delta = run("o1", 0)
    kept = delta.abs() > 1e-3
    torch.testing.assert_close(delta[kept], torch.full_like(delta[kept], 4.0), rtol=1e-5, atol=1e-5)  # 1 / (1-p)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(delta, run("o2", 0)) and not torch.equal(delta, run("o3", 1))


def test_mismatches_are_errors_not_skips(tmp_path):
    b = _ckpt(0)
    save_file(b, tmp_path / "b.safetensors")
    save_file({**b, "a.weight": torch.zeros(37, 12)}, tmp_path / "shape.safetensors")
    save_file({k: v for k, v in b.items() if k != "a.bias"}, tmp_path / "missing.safetensors")
    base, out = tmp_path / "b.safetensors", tmp_path / "out"
    with pytest.raises(ValueError, match=r"'a.weight' has shape \(37, 12\), base has \(37, 11\)"):
        merge_checkpoints(MergeConfig(base, tmp_path / "shape.safetensors", base, out))
    with pytest.raises(ValueError, match=r"missing \['a.bias'\]"):
        merge_checkpoints(MergeConfig(base, base, tmp_path / "missing.safetensors", tmp_path / "out2"))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.nope.lora_A.weight": torch.zeros(2, 3),
               "base_model.model.nope.lora_B.weight": torch.zeros(4, 2)}, lora / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="LoRA targets 'nope.weight'"):
        merge_checkpoints(MergeConfig(base, lora, base, tmp_path / "out3"))
    out.mkdir(exist_ok=True)
    (out / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        MergeConfig(base, base, base, out)
    with pytest.raises(ValueError, match="must be in"):
        MergeConfig(base, base, base, tmp_path / "o4", method="ties", ties_density=0.0)
    with pytest.raises(ValueError, match="base must be a full checkpoint"):
        MergeConfig(lora, base, base, tmp_path / "o5")


def test_report_diagnostics(tmp_path):
    g = torch.Generator().manual_seed(0)
    b = {"opp": torch.randn(30, 30, generator=g), "same": torch.randn(30, 30, generator=g),
         "tiny": torch.randn(30, 30, generator=g).bfloat16()}
    t = torch.randn(30, 30, generator=g)
    a = {"opp": b["opp"] + t, "same": b["same"] + t, "tiny": b["tiny"].float() + 1e-4}  # fp32 delta on bf16 base
    d = {"opp": b["opp"] - t, "same": b["same"] + 2 * t, "tiny": b["tiny"]}
    for name, sd in (("b", b), ("a", a), ("d", d)):
        save_file(sd, tmp_path / f"{name}.safetensors")
    rep = merge_checkpoints(MergeConfig(tmp_path / "b.safetensors", tmp_path / "a.safetensors",
                                        tmp_path / "d.safetensors", tmp_path / "out"))["tensors"]
    assert rep["opp"]["cosine"] == pytest.approx(-1.0, abs=1e-5) and rep["opp"]["sign_conflict"] == 1.0
    assert rep["same"]["cosine"] == pytest.approx(1.0, abs=1e-5) and rep["same"]["sign_conflict"] == 0.0
    assert rep["same"]["norm_delta_distill"] == pytest.approx(2 * rep["same"]["norm_delta_align"], rel=1e-4)
    assert rep["same"]["norm_merged_delta"] == pytest.approx(3 * t.norm().item(), rel=1e-4)
    assert rep["same"]["cast_rel_error"] < 1e-6  # fp32 storage keeps the delta
    # bf16 storage rounds a 1e-4 delta away on most entries: the report says so
    assert rep["tiny"]["cast_rel_error"] > 0.5 and rep["tiny"]["cosine"] is None


@pytest.fixture(scope="module")
def idle_rss_mib():
    from clvr_agent.eval.bench_merge import run_child

    return run_child(["idle"])[0]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])  # bf16 takes fp16's path (a converting copy)
def test_merge_child_keeps_inputs_out_of_anonymous_memory(tmp_path, idle_rss_mib, dtype):
    """A merge child's peak RssAnon stays a few chunks above an idle child's, whatever the dtype: the
    inputs (3 × 8 × 1024² here, 96 MiB in fp32) stay page cache. An fp32 merge that wrote into the
    memory-mapped slices (``.float()`` is a no-op view for fp32) held every touched input page."""
    from clvr_agent.eval.bench_merge import MIB, run_child, write_checkpoints

    largest = write_checkpoints(tmp_path, dtype, n_tensors=8, shape=(1024, 1024)) / MIB
    inputs = [tmp_path / "base", tmp_path / "aligned.safetensors", tmp_path / "distilled.safetensors"]
    total = sum(f.stat().st_size for f in [*(tmp_path / "base").glob("*.safetensors"), *inputs[1:]]) / MIB
    chunk_elems = 1 << 16  # 256 KiB fp32 chunks: the working set is a few MiB
    peak, _ = run_child([*map(str, inputs), str(tmp_path / "out"), "sum", "1", str(chunk_elems)])
    above = peak - idle_rss_mib
    assert above < 2 * largest + 24, f"{dtype}: peak RssAnon {above:.1f} MiB above idle for {total:.0f} MiB of inputs"
    out = _load_out(tmp_path / "out")
    assert len(out) == 16 and out["blocks.0.weight"].dtype == getattr(torch, dtype)


def test_bench_merge_cli_rejects_an_unknown_dtype():
    from typer.testing import CliRunner

    from clvr_agent.cli import app

    result = CliRunner().invoke(app, ["bench", "merge", "--dtype", "float64"])
    assert result.exit_code == 2 and "--dtype 'float64' is not one of float32, bfloat16, float16" in result.output


@pytest.mark.slow
def test_bench_merge_cli_reports_each_dtype_against_the_bound(tmp_path):
    """Two of the three dtypes (each costs three child processes; the default runs all three)."""
    from typer.testing import CliRunner

    from clvr_agent.cli import app

    out = tmp_path / "merge.json"
    args = ["bench", "merge", "--dtype", "float32", "--dtype", "bfloat16", "--tensors", "2", "--rows", "256",
            "--cols", "512", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["dtype"] for r in report["rows"]] == ["float32", "bfloat16"] and report["pass"]
    for row in report["rows"]:
        assert row["budget_mb"] == 2 * row["largest_tensor_mb"] + 200 and row["peak_rss_above_idle_mb"] <= row["budget_mb"]
    assert report["rows"][0]["largest_tensor_mb"] == 256 * 512 * 4 / 2**20
