"""Diffusion training on the tiny real-class FLUX.2 [klein]: flow matching, SFT, distillation, PPRL, CLI.

Every trainer here mutates its pipeline, so each test builds a private one (``build_tiny_flux2_klein``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clvr_agent.tools.tiny import build_tiny_flux2_klein
from clvr_agent.training import flow_matching as fm

from tests._pprl import SEQ, H, W, brightness, pprl_config



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pipe(distilled=False):
    return build_tiny_flux2_klein(distilled=distilled, seed=0)


def _solid(rgb, size=H):
    return Image.new("RGB", (size, size), rgb)


@pytest.fixture()
def sft_data(tmp_path):
    """Four fixed examples: solid colour targets named by the prompt, 0–2 reference canvases."""
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}
    for name, rgb in colours.items():
        _solid(rgb).save(tmp_path / f"{name}.png")
    recs = [
        {"prompt": "a red canvas", "references": [], "target": "red.png"},
        {"prompt": "a blue canvas", "references": ["red.png"], "target": "blue.png"},
        {"prompt": "a green canvas", "references": ["red.png", "blue.png"], "target": "green.png"},
        {"prompt": "a white canvas", "references": [], "target": "white.png"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def _sft_config(tmp_path, **kw):
    from clvr_agent.training.sft_diffusion import SFTDiffusionConfig

    base = dict(output_dir=str(tmp_path / "sft-out"), height=H, width=W, batch_size=4, learning_rate=3e-3,
                max_sequence_length=SEQ, bn_stats_samples=4, checkpoint_every=0, log_every=0, lr_scheduler="constant")
    return SFTDiffusionConfig(**{**base, **kw})


def _eval_loss(trainer, examples):
    """The loss on fixed noise, σ and dropout draws (keys no training step uses)."""
    modes = {n: m.training for n, m in trainer.modules.items()}
    for m in trainer.modules.values():
        m.eval()
    with torch.no_grad():
        loss, logs = trainer.loss(examples, [10**9 + i for i in range(len(examples))])
    for n, m in trainer.modules.items():
        m.train(modes[n])
    return loss.item(), logs


# ----------------------------------------------------------------------------------------- flow matching


def test_reference_tokens_follow_the_pipeline_layout():
    pipe = _pipe()
    refs = [_solid((200, 10, 10), 64), _solid((10, 10, 200), 64)]
    px = [pipe.image_processor.preprocess(r, height=64, width=64) for r in refs]
    want_tokens, want_ids = pipe.prepare_image_latents(px, batch_size=2, generator=None, device="cpu", dtype=torch.float32)
    stacked = fm.to_pixels(pipe, refs, 64, 64)  # (2, 3, H, W): one example's two canvases
    tokens, ids = fm.pack_references(pipe, stacked.unsqueeze(0).expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(tokens, want_tokens)
    assert torch.equal(ids, want_ids)


def test_loss_is_on_target_tokens_only_and_gradients_flow():
    pipe = _pipe()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 4, 4, generator=gen)  # (B, 4C, h, w)
    refs = torch.rand(2, 2, 3, H, W, generator=gen) * 2 - 1  # two reference canvases per example, in [-1, 1]
    emb, text_ids = fm.encode_text(pipe, ["a red circle", "a blue square"], max_sequence_length=SEQ)
    cond = fm.make_condition(pipe, emb, text_ids, refs)
    x0_tok, x_ids = fm.pack_target(pipe, x0)
    n_t = x0_tok.shape[1]
    sigma = torch.tensor([0.3, 0.8])
    x_t, target = fm.noisy_target(x0_tok, torch.randn(x0_tok.shape, generator=gen), sigma)
    pred = fm.transformer_forward(pipe.transformer, x_t, x_ids, sigma, cond)
    assert pred.shape[1] == n_t + cond.ref_tokens.shape[1]

    full_target = torch.cat([target, torch.zeros_like(cond.ref_tokens)], dim=1)
    loss = fm.flow_matching_loss(pred, full_target, n_t)
    other = torch.cat([target, 100 * torch.randn(cond.ref_tokens.shape, generator=gen)], dim=1)
    assert fm.flow_matching_loss(pred, other, n_t).item() == loss.item()
    perturbed = pred.detach().clone()
    perturbed[:, n_t:] += 50.0
    assert fm.flow_matching_loss(perturbed, full_target, n_t).item() == loss.item()
    # the references still condition the target tokens: they are in the sequence, not in the loss
    other_cond = fm.make_condition(pipe, emb, text_ids, refs + 1.0)
    assert not torch.allclose(fm.transformer_forward(pipe.transformer, x_t, x_ids, sigma, other_cond)[:, :n_t], pred[:, :n_t])

    loss.backward()
    grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_latent_bn_stats_describe_the_latents():
    pipe = _pipe()
    imgs = [_solid((int(c), 90, 200 - int(c))) for c in np.linspace(0, 200, 6)]
    mean, var = fm.latent_bn_stats(pipe, [fm.to_pixels(pipe, imgs, H, W)])
    fm.set_latent_bn_stats(pipe.vae, mean, var)
    z = fm.encode_images(pipe, fm.to_pixels(pipe, imgs, H, W))  # normalised with the new statistics
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------------- SFT


def test_trajectory_records_become_triplets(tmp_path):
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer
    from clvr_agent.types import ExecutorRequest, ImageRef, PassiveCheck, Region, Step, Trajectory

    ref = lambda name: ImageRef(path=name, sha256="0" * 64, width=16, height=16, size_bytes=1)  # noqa: E731
    steps = [
        Step(index=0, iteration=0, instruction="draw", request=ExecutorRequest(mode="generate", instruction="draw",
             accumulated_prompt="a red circle", seed=0), canvas=ref("c0.png"), passive=PassiveCheck(executed=True)),
        Step(index=1, iteration=1, instruction="add", request=ExecutorRequest(mode="edit", instruction="add",
             accumulated_prompt="a red circle. add", references=[ref("c0.png")], seed=0), canvas=ref("c1.png"),
             passive=PassiveCheck(executed=False)),  # did not execute: dropped
        Step(index=2, iteration=2, instruction="fix", request=ExecutorRequest(mode="edit", instruction="fix",
             accumulated_prompt="a red circle. fix", references=[ref("c0.png")], seed=0), canvas=ref("c2.png")),
        # a region draw: the region drawn alone from its own prompt, pasted -> a text-to-image example of the region
        Step(index=3, iteration=3, instruction="add a blue square", request=ExecutorRequest(
             mode="inpaint", instruction="add a blue square", accumulated_prompt="a red circle. fix\nadd a blue square",
             references=[ref("c2.png")], seed=0, region=Region(x0=8, y0=0, x1=16, y1=8),
             region_prompt="a photo of a blue square"), canvas=ref("c3.png")),
    ]
    path = tmp_path / "traj.jsonl"
    path.write_text(Trajectory(prompt="a red circle", seed=0, steps=steps).model_dump_json() + "\n")
    ds = SFTDiffusionDataset.from_jsonl(path)
    assert [(e.prompt, [p.rsplit("/", 1)[1] for p in e.references], e.target.rsplit("/", 1)[1], e.crop) for e in ds.examples] == [
        ("a red circle", [], "c0.png", None), ("a red circle. fix", ["c0.png"], "c2.png", None),
        ("a photo of a blue square", [], "c3.png", (8, 0, 16, 8))]
    canvas = Image.new("RGB", (16, 16), (200, 200, 200))
    canvas.paste((30, 30, 220), (8, 0, 16, 8))
    canvas.save(tmp_path / "c3.png")
    trainer = SFTDiffusionTrainer.__new__(SFTDiffusionTrainer)  # only its image reader
    region = trainer._open(ds.examples[2].target, ds.examples[2].crop)
    assert region.size == (8, 8) and region.getcolors() == [(64, (30, 30, 220))]


def test_sft_trains_transformer_text_encoder_and_vae(tmp_path, sft_data):
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    pipe = _pipe()
    ds = SFTDiffusionDataset.from_jsonl(sft_data)
    cfg = _sft_config(tmp_path, max_steps=30, train_text_encoder=True, train_vae=True, cfg_dropout=0.0)
    tr = SFTDiffusionTrainer(pipe, cfg, ds)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in tr.modules.items()}
    tr.set_bn_stats_from_data()
    loss0, logs0 = _eval_loss(tr, ds.examples)
    history = tr.train()
    loss1, logs1 = _eval_loss(tr, ds.examples)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert loss1 < 0.85 * loss0, (loss0, loss1)  # measured 2.86 -> 2.25
    assert logs1["vae_recon"] < logs0["vae_recon"]
    for name, m in tr.modules.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], m.parameters())), f"{name} did not change"
    assert json.loads((tmp_path / "sft-out" / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"


def test_sft_resume_continues_at_the_right_step(tmp_path, sft_data):
    import shutil

    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    ds = SFTDiffusionDataset.from_jsonl(sft_data)
    cfg = _sft_config(tmp_path, max_steps=6, batch_size=2, checkpoint_every=3)
    straight = SFTDiffusionTrainer(_pipe(), cfg, ds)
    straight.train()
    ckpts = sorted(p.name for p in (tmp_path / "sft-out" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    shutil.rmtree(tmp_path / "sft-out" / "checkpoints" / "step-0000006")  # as if killed after step 3

    resumed = SFTDiffusionTrainer(_pipe(), _sft_config(tmp_path, max_steps=6, batch_size=2, checkpoint_every=3, resume=True), ds)
    history = resumed.train()
    assert [h["step"] for h in history] == [4, 5, 6]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in straight.history[3:]], rel=1e-5)
    for a, b in zip(straight.pipe.transformer.parameters(), resumed.pipe.transformer.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    changed = _sft_config(tmp_path, max_steps=9, batch_size=2, checkpoint_every=3, resume=True,
                          learning_rate=cfg.learning_rate / 2)
    with pytest.raises(ValueError, match="trained with learning_rate"):
        SFTDiffusionTrainer(_pipe(), changed, ds).train()


def test_lora_checkpoint_holds_only_the_adapter_and_resumes(tmp_path, sft_data):
    import shutil

    from safetensors.torch import load_file

    from clvr_agent.training import diffusion_loop as dl
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    ds = SFTDiffusionDataset.from_jsonl(sft_data)
    kw = dict(max_steps=3, batch_size=2, lora_rank=4, checkpoint_every=2)
    straight = SFTDiffusionTrainer(_pipe(), _sft_config(tmp_path, **kw), ds)
    straight.train()
    ckpt = tmp_path / "sft-out" / "checkpoints" / "step-0000002"
    keys = list(load_file(str(ckpt / "model.safetensors")))
    assert keys and all("lora_" in k for k in keys)  # the frozen base weights are not copied into checkpoints
    shutil.rmtree(tmp_path / "sft-out" / "checkpoints" / "step-0000003")  # as if killed after step 2
    resumed = SFTDiffusionTrainer(_pipe(), _sft_config(tmp_path, resume=True, **kw), ds)
    assert [h["loss"] for h in resumed.train()] == pytest.approx([h["loss"] for h in straight.history[2:]], rel=1e-6)
    # a plain pipeline with the same adapter takes the checkpoint (what scripts/clvr_mini use mid-run)
    probe = _pipe()
    dl.add_lora(probe.transformer, 4, 8.0)
    assert dl.apply_checkpoint(probe, tmp_path / "sft-out" / "checkpoints" / "step-0000003") == 3
    for (n, a), b in zip(straight.pipe.transformer.state_dict().items(), probe.transformer.state_dict().values()):
        torch.testing.assert_close(b, a, msg=n)


def test_sft_lora_changes_only_the_adapter_and_exports_fused(tmp_path, sft_data):
    from diffusers import Flux2KleinPipeline

    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    pipe = _pipe()
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    tr = SFTDiffusionTrainer(pipe, _sft_config(tmp_path, max_steps=3, lora_rank=4), SFTDiffusionDataset.from_jsonl(sft_data))
    tr.train()
    sd = pipe.transformer.state_dict()
    assert all(torch.equal(sd[k.replace(".weight", ".base_layer.weight")] if k.replace(".weight", ".base_layer.weight") in sd else sd[k], v)
               for k, v in base.items())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)

    loaded = Flux2KleinPipeline.from_pretrained(tmp_path / "sft-out")
    gen = torch.Generator().manual_seed(0)
    x, x_ids = fm.pack_target(pipe, torch.randn(1, 16, 4, 4, generator=gen))
    with torch.no_grad():
        cond = fm.Condition(*fm.encode_text(pipe, ["a red canvas"], max_sequence_length=SEQ))
        v_lora = fm.velocity(pipe.transformer, x, x_ids, torch.tensor([0.5]), cond)
        v_fused = fm.velocity(loaded.transformer, x, x_ids, torch.tensor([0.5]), cond)
    torch.testing.assert_close(v_fused, v_lora, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora_rank, lr", [(0, 3e-3), (4, 3e-2)])
def test_prior_weight_keeps_text_to_image_velocity_near_the_base(tmp_path, sft_data, lora_rank, lr):
    """Half the data are text-to-image examples: with prior preservation the fine-tuned model's velocity on
    their prompts stays closer to the base's (a frozen copy, or the LoRA's disabled adapter) than without."""
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    ds = SFTDiffusionDataset.from_jsonl(sft_data)
    base = _pipe()
    gen = torch.Generator().manual_seed(1)
    x, x_ids = fm.pack_target(base, torch.randn(4, 16, 4, 4, generator=gen))
    sigma = torch.tensor([0.2, 0.5, 0.8, 0.95])
    prompts = ["a red canvas", "a white canvas"] * 2  # the text-to-image examples' prompts

    def velocity(pipe):
        with torch.no_grad():
            return fm.velocity(pipe.transformer, x, x_ids, sigma, fm.Condition(*fm.encode_text(pipe, prompts, max_sequence_length=SEQ)))

    v_base = velocity(base)
    drift = {}
    for weight in (0.0, 4.0):
        pipe = _pipe()
        tr = SFTDiffusionTrainer(pipe, _sft_config(tmp_path / str(weight), max_steps=25, lora_rank=lora_rank, learning_rate=lr,
                                                   prior_weight=weight, cfg_dropout=0.0), ds)
        history = tr.train()
        assert ("prior" in history[-1]) == (weight > 0)
        drift[weight] = torch.mean((velocity(pipe) - v_base) ** 2).item()
    assert drift[4.0] < 0.5 * drift[0.0], drift  # measured: full 0.43 -> 0.11, LoRA 0.30 -> 0.007


def test_prior_only_records_keep_their_prompts_velocity_near_the_base(tmp_path, sft_data):
    """Prompts with no target (prior-only records): training with them keeps the velocity on those prompts,
    at the base's own draws of them, closer to the base's than the same run without them; without a
    prior weight such data is refused."""
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    held = ["a purple canvas", "a yellow canvas"]
    with_prior = tmp_path / "with_prior.jsonl"
    with_prior.write_text(sft_data.read_text() + "".join(json.dumps({"prompt": q, "prior_only": True}) + "\n" for q in held))
    with pytest.raises(ValueError, match="prior_weight > 0"):
        SFTDiffusionTrainer(_pipe(), _sft_config(tmp_path / "refused"), SFTDiffusionDataset.from_jsonl(with_prior))
    with pytest.raises(ValueError, match="prompt alone"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "x", "prior_only": True, "target": "red.png"}) + "\n")
        SFTDiffusionDataset.from_jsonl(bad)

    base = _pipe()
    gen = torch.Generator().manual_seed(1)
    x, x_ids = fm.pack_target(base, torch.randn(4, 16, 4, 4, generator=gen))
    sigma = torch.tensor([0.2, 0.5, 0.8, 0.95])

    def velocity(pipe):
        with torch.no_grad():
            return fm.velocity(pipe.transformer, x, x_ids, sigma, fm.Condition(*fm.encode_text(pipe, held * 2, max_sequence_length=SEQ)))

    v_base = velocity(base)
    drift = {}
    for name, data in (("without", sft_data), ("with", with_prior)):
        pipe = _pipe()
        tr = SFTDiffusionTrainer(pipe, _sft_config(tmp_path / name, max_steps=25, batch_size=6, prior_weight=4.0,
                                                   cfg_dropout=0.0, prior_sample_steps=2), SFTDiffusionDataset.from_jsonl(data))
        history = tr.train()
        assert ("prior_only" in history[-1]) == (name == "with")
        drift[name] = torch.mean((velocity(pipe) - v_base) ** 2).item()
    assert drift["with"] < 0.5 * drift["without"], drift  # measured: 0.109 -> 0.033


# ---------------------------------------------------------------------------------------------- distill


def test_distill_student_approaches_teacher_and_saves_distilled(tmp_path):
    from diffusers import Flux2KleinPipeline

    from clvr_agent.training.distill import DistillConfig, DistillTrainer

    pipe = _pipe(distilled=False)
    cfg = DistillConfig(output_dir=str(tmp_path / "student"), height=H, width=W, student_steps=4, teacher_steps=16,
                        guidance_scale=3.0, num_pairs=8, batch_size=8, max_steps=40, learning_rate=2e-3,
                        max_sequence_length=SEQ, checkpoint_every=0, log_every=0)
    prompts = ["a red circle", "a blue square"]
    tr = DistillTrainer(pipe, cfg, prompts)

    def student_gap():
        """MSE between the student's 4-step Euler endpoint and the teacher's, from the cached noise."""
        st = tr.cache["states"]
        cond = tr.batch_condition(tr.cache["prompt"].tolist())
        ids = tr.cache["x_ids"].expand(st.shape[0], -1, -1)
        with torch.no_grad():
            out, _ = fm.sample_flow(pipe.transformer, st[:, 0], ids, cond, tr.student_sigmas(st.shape[2]))
        return torch.mean((out[:, -1] - st[:, -1]) ** 2).item()

    tr.cache = tr.build_cache()
    gap0 = student_gap()
    tr.cache = None
    history = tr.train()
    gap1 = student_gap()
    assert gap1 < 0.5 * gap0, (gap0, gap1)
    assert np.mean([h["loss"] for h in history[-5:]]) < np.mean([h["loss"] for h in history[:5]])

    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["is_distilled"] is True
    student = Flux2KleinPipeline.from_pretrained(tmp_path / "student")
    assert student.config.is_distilled
    for a, b in zip(student.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b)
    img = student(prompt="a red circle", num_inference_steps=4, height=H, width=W, max_sequence_length=SEQ,
                  output_type="np").images
    assert img.shape == (1, H, W, 3)


# ------------------------------------------------------------------------------------------------- PPRL


def test_sde_sampler_with_zero_noise_is_the_pipeline_sampler():
    pipe = _pipe(distilled=False)
    noise = fm.initial_noise(pipe, 1, H, W, torch.Generator().manual_seed(0))
    want = pipe(prompt="a red circle", latents=noise, num_inference_steps=4, guidance_scale=3.0, height=H, width=W,
                max_sequence_length=SEQ, output_type="pt").images
    with torch.no_grad():
        cond = fm.Condition(*fm.encode_text(pipe, ["a red circle"], max_sequence_length=SEQ))
        uncond = fm.Condition(*fm.encode_text(pipe, [""], max_sequence_length=SEQ))
        x, x_ids = fm.pack_target(pipe, noise)
        states, logps = fm.sample_flow(pipe.transformer, x, x_ids, cond, fm.inference_sigmas(pipe, 4, x.shape[1]),
                                       uncond=uncond, guidance_scale=3.0, noise_level=0.0)
        got = fm.decode_tokens(pipe, states[:, -1], x_ids, H, W, output_type="pt")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(logps, torch.zeros_like(logps))
    # and with noise the same sampler explores
    with torch.no_grad():
        noisy, _ = fm.sample_flow(pipe.transformer, x, x_ids, cond, fm.inference_sigmas(pipe, 4, x.shape[1]),
                                  noise_level=0.7, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy[:, -1], states[:, -1])


def test_flow_grpo_scheduler_steps_like_euler_at_zero_noise_and_scores_its_samples():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from clvr_agent.training import diffusers_adapter as da

    pipe = _pipe(distilled=False)
    euler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    grpo = fm.FlowGRPOScheduler.from_config(pipe.scheduler.config)
    for sched in (euler, grpo):
        da.retrieve_timesteps(sched, 4, None, sigmas=np.linspace(1.0, 0.25, 4), mu=da.compute_empirical_mu(16, 4))
    gen = torch.Generator().manual_seed(0)
    xe = xg = torch.randn(2, 16, 16, generator=gen)
    for t in euler.timesteps:  # diffusers' own loop, the same velocities
        v = torch.randn(xe.shape, generator=gen)
        xe, xg = euler.step(v, t, xe).prev_sample, grpo.step(v, t, xg).prev_sample
    torch.testing.assert_close(xg, xe)
    # with noise: a Gaussian step whose log-prob is the density of what it drew, and re-scoring gives it back
    x, v = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 16, 16, generator=gen)
    out = fm.FlowGRPOScheduler.sde_step(v, x, 0.8, 0.6, 0.7, sigma_max_safe=0.8, generator=gen)
    want = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, want)
    again = fm.FlowGRPOScheduler.sde_step(v, x, 0.8, 0.6, 0.7, sigma_max_safe=0.8, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_pprl_on_policy_ratio_is_exactly_one(tmp_path):
    from clvr_agent.training.pprl import PPRLTrainer

    cfg = pprl_config(tmp_path, num_steps=4, guidance_scale=3.0, kl_coef=0.1)
    tr = PPRLTrainer(_pipe(), cfg, ["a red circle", "a blue square"], brightness)
    rollouts = [tr.rollout(0), tr.rollout(1)]
    tr.advantages(rollouts)
    for ro in rollouts:
        assert ro.states.shape[:2] == (4, 5) and ro.log_probs.shape == (4, 4)
        assert torch.equal(ro.log_probs[:, -1], torch.zeros(4))  # the last step is a plain ODE step
        stats = tr.policy_loss(ro, backward=False)
        assert torch.equal(stats["ratios"], torch.ones_like(stats["ratios"]))
        assert stats["kl"] == 0.0  # the fresh LoRA is zero: policy == adapter-disabled reference
        torch.testing.assert_close(ro.advantages.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_pprl_resume_replays_the_same_rollouts(tmp_path):
    import shutil

    from clvr_agent.training.pprl import PPRLTrainer

    prompts = ["a red circle", "a blue square"]
    cfg = pprl_config(tmp_path, max_steps=2, checkpoint_every=1, lr_scheduler="linear", learning_rate=1e-2)
    straight = PPRLTrainer(_pipe(), cfg, prompts, brightness)
    straight.train()
    shutil.rmtree(tmp_path / "pprl" / "checkpoints" / "step-0000002")
    resumed = PPRLTrainer(_pipe(), pprl_config(tmp_path, max_steps=2, checkpoint_every=1, lr_scheduler="linear",
                                                learning_rate=1e-2, resume=True), prompts, brightness)
    (rec,) = resumed.train()  # the sampling noise continues from the checkpointed generator
    want = straight.history[1]
    assert rec["step"] == 2 and rec["lr"] == want["lr"] == 5e-3
    assert (rec["reward_mean"], rec["loss"]) == pytest.approx((want["reward_mean"], want["loss"]), rel=1e-6)


def test_pprl_raises_a_toy_reward(tmp_path):
    from clvr_agent.training.pprl import PPRLTrainer

    cfg = pprl_config(tmp_path, max_steps=30, learning_rate=1e-2, clip_range=1e-2)
    tr = PPRLTrainer(_pipe(), cfg, ["a red circle", "a blue square"], brightness)
    history = tr.train()
    r = [h["reward_mean"] for h in history]
    assert all(h["ratio_mean"] == 1.0 for h in history)  # one optimizer step per rollout: on-policy
    assert np.mean(r[-5:]) > np.mean(r[:5]) + 0.005, r
    assert json.loads((tmp_path / "pprl" / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"


# -------------------------------------------------------------------------------------------- configs, CLI


@pytest.mark.parametrize("cls, kw, match", [
    ("SFTDiffusionConfig", dict(lora_rank=4, train_transformer=False, train_vae=True), "set train_transformer"),
    ("SFTDiffusionConfig", dict(batch_size=3, gradient_accumulation_steps=2), "multiple of gradient_accumulation"),
    ("SFTDiffusionConfig", dict(prior_weight=-1.0), "prior_weight must be a finite number ≥ 0"),
    ("SFTDiffusionConfig", dict(prior_weight=1.0, train_text_encoder=True), "train the transformer only"),
    ("DistillConfig", dict(teacher_steps=30, student_steps=4), "multiple of student_steps"),
    ("PPRLConfig", dict(ppo_epochs=0), "ppo_epochs must be ≥ 1"),
    ("PPRLConfig", dict(kl_coef=-0.1), "kl_coef must be a finite number ≥ 0"),
    ("PPRLConfig", dict(noise_level=0.0), "noise_level must be > 0"),
])
def test_configs_reject_bad_input_with_a_fix(cls, kw, match):
    from clvr_agent.training import diffusion_configs

    with pytest.raises(ValueError, match=match):
        getattr(diffusion_configs, cls)(**kw)


def test_sizes_default_to_the_models_native_size(tmp_path, sft_data):
    from typer.testing import CliRunner

    from clvr_agent.cli.train import train_app
    from clvr_agent.training import diffusion_loop as dl
    from clvr_agent.training.distill import DistillConfig, DistillTrainer

    pipe = _pipe(distilled=False)
    assert dl.native_size(pipe) == 256  # default_sample_size 128 × the tiny VAE's scale factor 2 (klein: 1024)
    tr = DistillTrainer(pipe, DistillConfig(output_dir=str(tmp_path / "d"), max_sequence_length=SEQ), ["a red circle"])
    assert (tr.cfg.height, tr.cfg.width) == (256, 256)
    x, _ = fm.noise_tokens(pipe, 1, tr.cfg.height, tr.cfg.width, None)
    assert x.shape[1] == (256 // 4) ** 2  # the student's σ grid is computed for these 4096 tokens
    with pytest.raises(ValueError, match="both be > 0, or both 0"):
        DistillConfig(height=64)
    # a folder that names its draw size (clvr-mini's clvr_canvas.json) trains at that size
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    (model / "clvr_canvas.json").write_text(json.dumps({"draw_size": H, "canvas_size": 64}))
    res = CliRunner().invoke(train_app, ["sft-diffusion", "--model", str(model), "--data", str(sft_data), "--out",
                                         str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2",
                                         "--bn-stats-samples", "2", "--max-sequence-length", str(SEQ)])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "training_args.json").read_text())
    assert (card["height"], card["width"]) == (H, W)


def test_text_encoder_out_layers_come_from_the_folder(tmp_path):
    from diffusers import Flux2KleinPipeline

    from clvr_agent.tools.flux2_klein import OUT_LAYERS_KEY, Flux2KleinExecutor, text_encoder_out_layers
    from clvr_agent.types import ExecutorRequest

    pipe = _pipe()
    default = fm.encode_text(pipe, ["a red canvas"], max_sequence_length=SEQ)[0]
    setattr(pipe.text_encoder.config, OUT_LAYERS_KEY, [9, 18, 26])
    pipe.save_pretrained(tmp_path / "m")
    loaded = Flux2KleinPipeline.from_pretrained(tmp_path / "m")
    assert text_encoder_out_layers(loaded) == (9, 18, 26)
    with torch.no_grad():
        got = fm.encode_text(loaded, ["a red canvas"], max_sequence_length=SEQ)[0]
        want = loaded.encode_prompt(["a red canvas"], max_sequence_length=SEQ, text_encoder_out_layers=(9, 18, 26))[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, default)
    request = ExecutorRequest(mode="generate", instruction="a", accumulated_prompt="a red canvas", seed=0)
    _, kwargs = Flux2KleinExecutor(loaded)._call_arguments(request, [])
    assert tuple(kwargs["text_encoder_out_layers"]) == (9, 18, 26)


def test_cli_sft_diffusion_runs_and_rejects_bad_flags(tmp_path, sft_data):
    from typer.testing import CliRunner

    from clvr_agent.cli.train import train_app

    model = tmp_path / "model"
    _pipe().save_pretrained(model)
    (tmp_path / "cfg.json").write_text(json.dumps({"height": H, "width": W, "max_sequence_length": SEQ}))
    runner = CliRunner()
    args = ["sft-diffusion", "--model", str(model), "--data", str(sft_data), "--out", str(tmp_path / "o"),
            "--config", str(tmp_path / "cfg.json"), "--max-steps", "2", "--batch-size", "2", "--bn-stats-samples", "2",
            "--lr-scheduler", "linear"]
    res = runner.invoke(train_app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == 2
    assert (tmp_path / "o" / "model_index.json").is_file()

    bad = runner.invoke(train_app, args[:-2] + ["--cfg-dropout", "1.5"])
    assert bad.exit_code == 2 and "cfg_dropout" in bad.output
    bad = runner.invoke(train_app, ["distill", "--model", str(model), "--prompts", str(tmp_path / "missing.txt")])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_shapeworld_reward_judges_small_samples_at_canvas_size():
    from clvr_agent.training.pprl_data import ProxyPrompt
    from clvr_agent.training.pprl_shapeworld import shapeworld_reward
    from clvr_agent.tools.shapeworld.render import render
    from clvr_agent.tools.shapeworld.world import Obj, Scene

    scene = Scene(objects=[Obj("circle", "red", 40, 90, 64), Obj("square", "blue", 160, 90, 64)])
    full = render(scene)
    small = full.resize((64, 64))
    prompt = "a photo of a red circle left of a blue square"
    assert shapeworld_reward([full, small], [ProxyPrompt(prompt)] * 2) == [1.0, 1.0]
    assert shapeworld_reward([full], [ProxyPrompt("a photo of a green star")])[0] < 1.0
