"""Configs of the diffusion training stages (trajectory SFT, 4-step distillation, PPRL).

Kept free of torch so the ``clvr train`` CLI can build its flags from these fields without importing
a model stack; each stage module re-exports its config next to its trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clvr_agent.training.base_config import TrainConfig

# Every attention projection of the double- and single-stream FLUX.2 blocks (Flow-GRPO's choice for SD3).
LORA_TARGET_MODULES = (
    r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)$"
    r"|.*single_transformer_blocks\.\d+\.attn\.to_out$"
)


SIZE_HELP = "pixels; 0 = the model's native size (its folder's clvr_canvas.json draw_size, else the pipeline default: 1024 for klein)"


def check_size(height: int, width: int) -> None:
    if height < 0 or width < 0 or (height == 0) != (width == 0):
        raise ValueError(f"height and width must both be > 0, or both 0 for the model's native size; got {height}×{width}")


@dataclass
class SFTDiffusionConfig(TrainConfig):
    """Flow-matching SFT of FLUX.2 [klein] on trajectory triplets."""

    output_dir: str = field(default="runs/sft-diffusion", metadata={"help": "Diffusers folder written at the end; checkpoints under <output_dir>/checkpoints."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "constant | constant_with_warmup | linear | cosine (one step per optimizer step, whatever the number of processes)."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the transformer's attention projections; 0 = full fine-tune."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    height: int = field(default=0, metadata={"help": f"Training height ({SIZE_HELP}); a multiple of 2 × the VAE scale factor."})
    width: int = field(default=0, metadata={"help": f"Training width ({SIZE_HELP})."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimizer step per process (split into micro-batches)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2."})
    train_transformer: bool = field(default=True, metadata={"help": "Train the transformer (fully, or its LoRA if lora_rank > 0)."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Train the text encoder through the flow-matching loss."})
    train_vae: bool = field(default=False, metadata={"help": "Train the VAE with a reconstruction loss; latent BN statistics then follow an EMA."})
    vae_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the VAE reconstruction MSE."})
    cfg_dropout: float = field(default=0.1, metadata={"help": "Probability of training on the empty prompt (enables CFG)."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal σ distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal σ distribution."})
    timestep_shift: float = field(default=1.0, metadata={"help": "σ shift s: σ' = sσ/(1+(s-1)σ); 1 = none."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})
    max_references: int = field(default=3, metadata={"help": "Keep at most this many (most recent) reference canvases."})
    set_bn_stats: bool = field(default=True, metadata={"help": "Before training, set the VAE's latent BN statistics from bn_stats_samples targets."})
    bn_stats_samples: int = field(default=256, metadata={"help": "Targets used for the latent BN statistics."})
    bn_momentum: float = field(default=0.01, metadata={"help": "EMA momentum of the latent BN statistics while the VAE trains."})
    prior_weight: float = field(default=0.0, metadata={"help": "Prior preservation: on every text-to-image example of a batch (no reference canvases) add this weight × the MSE to the frozen base transformer's velocity at the same noisy input (a LoRA's disabled adapter, or a frozen copy of the initial transformer for a full fine-tune); the share is the data's text-to-image share. Prior-only records (a prompt, no target) add this term alone. 0 = off."})
    prior_sample_steps: int = field(default=8, metadata={"help": "Euler steps (no CFG) of the frozen base's own draw of a prior-only example's prompt; the prior is regressed at that draw, noised to the example's σ."})

    def __post_init__(self):
        super().__post_init__()
        check_size(self.height, self.width)
        self.check_batch(self.batch_size, self.gradient_accumulation_steps)
        if not (self.prior_weight >= 0 and math.isfinite(self.prior_weight)):
            raise ValueError(f"prior_weight must be a finite number ≥ 0 (0 = off; 0.5–2 keeps the base's drawing), got {self.prior_weight}")
        if self.prior_sample_steps < 1:
            raise ValueError(f"prior_sample_steps must be ≥ 1 (8 is a recognisable draw for clvr-mini), got {self.prior_sample_steps}")
        if self.prior_weight > 0 and (self.train_text_encoder or self.train_vae or not self.train_transformer):
            raise ValueError("prior_weight regresses the frozen base transformer's velocity on the base's text and latents: "
                             "train the transformer only (drop train_text_encoder and train_vae) or set prior_weight 0")
        if not (self.train_transformer or self.train_text_encoder or self.train_vae):
            raise ValueError("nothing to train: set at least one of train_transformer, train_text_encoder, train_vae")
        if self.lora_rank > 0 and not self.train_transformer:
            raise ValueError("lora_rank applies to the transformer: set train_transformer or lora_rank 0")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.logit_std <= 0 or self.timestep_shift <= 0:
            raise ValueError("logit_std and timestep_shift must be > 0")
        if not 0 <= self.max_references <= 3:
            raise ValueError("max_references must be 0..3 (the loop passes at most three canvases)")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError("bn_momentum must be in (0, 1]")


@dataclass
class PPRLConfig(TrainConfig):
    """Flow-GRPO on proxy prompts (defaults: Flow-GRPO's small-testbed recipe)."""

    output_dir: str = field(default="runs/pprl", metadata={"help": "Diffusers folder written at the end (LoRA fused); checkpoints inside."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps; each samples groups_per_step × group_size images."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank on the transformer; 0 = full fine-tune."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate); the SDE maths stays fp32."})
    seed: int = field(default=0, metadata={"help": "Seed for prompt order and sampling noise."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save a resumable checkpoint every N steps (0 = only at the end)."})
    log_every: int = field(default=1, metadata={"help": "Append a line to <output_dir>/log.jsonl every N steps (0 = never)."})
    height: int = field(default=0, metadata={"help": f"Sample height ({SIZE_HELP})."})
    width: int = field(default=0, metadata={"help": f"Sample width ({SIZE_HELP})."})
    num_steps: int = field(default=10, metadata={"help": "Sampling steps; the last one is a plain ODE step and is not trained."})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale during sampling and training (uncond branch detached); ≤ 1 = off."})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a: g = a·sqrt(σ/(1-σ)). 0 = ODE (no exploration)."})
    group_size: int = field(default=8, metadata={"help": "Images per proxy prompt (G)."})
    groups_per_step: int = field(default=2, metadata={"help": "Proxy prompts per optimizer step per process."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Train on the first fraction of the SDE steps (high noise first)."})
    text_weight: float = field(default=0.5, metadata={"help": "w in w·R_text + (1-w)·R_ref."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip ε (tiny: log-probs are means over latent dims)."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Clamp advantages to ±this."})
    global_std: bool = field(default=False, metadata={"help": "Normalise advantages by the std of all rewards in the step instead of per group."})
    ppo_epochs: int = field(default=1, metadata={"help": "Optimizer steps per rollout batch, each over all its groups; > 1 reuses the samples off-policy, so the ratio clip matters."})
    kl_coef: float = field(default=0.0, metadata={"help": "KL weight to the reference (the starting, e.g. SFT, model): the adapter-disabled model with LoRA, else a frozen copy of the starting transformer."})
    eval_every: int = field(default=0, metadata={"help": "Score the held-out contexts every N steps (and before the first); 0 = never."})
    eval_group_size: int = field(default=4, metadata={"help": "Images per held-out context (ODE sampling from fixed noise)."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})

    def __post_init__(self):
        super().__post_init__()
        check_size(self.height, self.width)
        if self.num_steps < 2:
            raise ValueError("num_steps must be ≥ 2: the last step is a deterministic ODE step that is not trained")
        if self.group_size < 2:
            raise ValueError("group_size must be ≥ 2: advantages are relative to the group")
        if self.groups_per_step < 1:
            raise ValueError("groups_per_step must be ≥ 1")
        if self.noise_level <= 0:
            raise ValueError("noise_level must be > 0 for RL (the log-prob of an ODE step is undefined); try 0.7")
        if not 0.0 < self.train_timestep_fraction <= 1.0:
            raise ValueError("train_timestep_fraction must be in (0, 1]")
        if not 0.0 <= self.text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {self.text_weight}")
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ValueError("clip_range and adv_clip_max must be > 0")
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be ≥ 1 (1 = on-policy, one optimizer step per rollout batch), got {self.ppo_epochs}")
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"kl_coef must be a finite number ≥ 0 (0 = no KL; Flow-GRPO uses 0.004–0.04), got {self.kl_coef}")
        if self.eval_every < 0 or self.eval_group_size < 1:
            raise ValueError("eval_every must be ≥ 0 (0 = no held-out curve) and eval_group_size ≥ 1")

    @property
    def train_steps(self) -> list[int]:
        n_sde = self.num_steps - 1
        return list(range(max(1, int(round(n_sde * self.train_timestep_fraction)))))


@dataclass
class DistillConfig(TrainConfig):
    """Trajectory (reflow) distillation into a few-step student."""

    output_dir: str = field(default="runs/distill", metadata={"help": "Diffusers folder (is_distilled=True) written at the end; checkpoints and teacher cache inside."})
    max_steps: int = field(default=1000, metadata={"help": "Student optimizer steps."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (fused at export, so the layout stays the same); 0 = full."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    seed: int = field(default=0, metadata={"help": "Seed for teacher noise and batch order."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint (and the cached teacher trajectories)."})
    height: int = field(default=0, metadata={"help": f"Height of teacher samples and student training ({SIZE_HELP}); the student's σ grid follows its token count."})
    width: int = field(default=0, metadata={"help": f"Width ({SIZE_HELP})."})
    student_steps: int = field(default=4, metadata={"help": "Steps the student is distilled to."})
    teacher_steps: int = field(default=32, metadata={"help": "Teacher Euler steps in all; a multiple of student_steps."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Teacher CFG scale (folded into the student)."})
    target: str = field(default="trajectory", metadata={"help": "trajectory (teacher segment velocities) | endpoint (k-step reflow)."})
    num_pairs: int = field(default=256, metadata={"help": "Teacher trajectories cached per process before training."})
    batch_size: int = field(default=16, metadata={"help": "Cached trajectories per optimizer step per process (also the teacher batch)."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})

    def __post_init__(self):
        super().__post_init__()
        check_size(self.height, self.width)
        self.check_batch(self.batch_size)
        if self.student_steps < 1:
            raise ValueError("student_steps must be ≥ 1")
        if self.teacher_steps < self.student_steps or self.teacher_steps % self.student_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of student_steps ({self.student_steps}), e.g. {8 * self.student_steps}")
        if self.target not in ("trajectory", "endpoint"):
            raise ValueError(f"target {self.target!r}: use trajectory or endpoint")
        if self.num_pairs < 1:
            raise ValueError("num_pairs must be ≥ 1")
