"""Configs of the diffusion training stages (trajectory SFT, 4-step distillation, PPRL).

Kept free of torch so the ``clvr train`` CLI can build its flags from these fields without importing
a model stack; each stage module re-exports its config next to its trainer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Every attention projection of the double- and single-stream FLUX.2 blocks (Flow-GRPO's choice for SD3).
LORA_TARGET_MODULES = (
    r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)$"
    r"|.*single_transformer_blocks\.\d+\.attn\.to_out$"
)


def check_lora_targets(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"lora_target_modules is not a valid regular expression ({exc}); pass a regex over module names") from None


@dataclass
class SFTDiffusionConfig:
    """Flow-matching SFT of FLUX.2 [klein] on trajectory triplets."""

    output_dir: str = field(default="runs/sft-diffusion", metadata={"help": "Diffusers folder written at the end; checkpoints under <output_dir>/checkpoints."})
    height: int = field(default=64, metadata={"help": "Training resolution (pixels); a multiple of 2 × the VAE scale factor."})
    width: int = field(default=64, metadata={"help": "Training resolution (pixels)."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimizer step per process (split into micro-batches)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "constant | constant_with_warmup | linear | cosine."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    train_transformer: bool = field(default=True, metadata={"help": "Train the transformer (fully, or its LoRA if lora_rank > 0)."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Train the text encoder through the flow-matching loss."})
    train_vae: bool = field(default=False, metadata={"help": "Train the VAE with a reconstruction loss; latent BN statistics then follow an EMA."})
    vae_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the VAE reconstruction MSE."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the transformer's attention projections; 0 = full fine-tune."})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha; 0 means 2 × rank."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    cfg_dropout: float = field(default=0.1, metadata={"help": "Probability of training on the empty prompt (enables CFG)."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal σ distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal σ distribution."})
    timestep_shift: float = field(default=1.0, metadata={"help": "σ shift s: σ' = sσ/(1+(s-1)σ); 1 = none."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})
    text_encoder_out_layers: tuple[int, ...] = field(default=(9, 18, 27), metadata={"help": "Text-encoder hidden states stacked into the prompt embedding."})
    max_references: int = field(default=3, metadata={"help": "Keep at most this many (most recent) reference canvases."})
    set_bn_stats: bool = field(default=True, metadata={"help": "Before training, set the VAE's latent BN statistics from bn_stats_samples targets."})
    bn_stats_samples: int = field(default=256, metadata={"help": "Targets used for the latent BN statistics."})
    bn_momentum: float = field(default=0.01, metadata={"help": "EMA momentum of the latent BN statistics while the VAE trains."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise and dropout."})
    checkpoint_every: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    log_every: int = field(default=10, metadata={"help": "Append a line to <output_dir>/log.jsonl every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})

    def __post_init__(self):
        self.text_encoder_out_layers = tuple(int(k) for k in self.text_encoder_out_layers)
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("max_steps, batch_size and gradient_accumulation_steps must be ≥ 1")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of gradient_accumulation_steps {self.gradient_accumulation_steps}")
        if not (self.train_transformer or self.train_text_encoder or self.train_vae):
            raise ValueError("nothing to train: set at least one of train_transformer, train_text_encoder, train_vae")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be ≥ 0 (0 = full fine-tune)")
        if self.lora_rank > 0 and not self.train_transformer:
            raise ValueError("lora_rank applies to the transformer: set train_transformer or lora_rank 0")
        if self.lora_rank and not self.lora_alpha:
            self.lora_alpha = 2.0 * self.lora_rank
        check_lora_targets(self.lora_target_modules)
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.logit_std <= 0 or self.timestep_shift <= 0:
            raise ValueError("logit_std and timestep_shift must be > 0")
        if self.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r}: use constant, constant_with_warmup, linear or cosine")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use no, fp16 or bf16")
        if not 0 <= self.max_references <= 3:
            raise ValueError("max_references must be 0..3 (the loop passes at most three canvases)")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError("bn_momentum must be in (0, 1]")


@dataclass
class PPRLConfig:
    """Flow-GRPO on proxy prompts (defaults: Flow-GRPO's small-testbed recipe)."""

    output_dir: str = field(default="runs/pprl", metadata={"help": "Diffusers folder written at the end (LoRA fused); checkpoints inside."})
    height: int = field(default=64, metadata={"help": "Sample height (pixels)."})
    width: int = field(default=64, metadata={"help": "Sample width (pixels)."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps; each samples groups_per_step × group_size images."})
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
    beta: float = field(default=0.0, metadata={"help": "KL weight to the adapter-disabled reference (needs lora_rank > 0)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank on the transformer; 0 = full fine-tune."})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha; 0 means 2 × rank."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})
    text_encoder_out_layers: tuple[int, ...] = field(default=(9, 18, 27), metadata={"help": "Text-encoder hidden states stacked into the prompt embedding."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate); the SDE maths stays fp32."})
    seed: int = field(default=0, metadata={"help": "Seed for prompt order and sampling noise."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save a resumable checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    log_every: int = field(default=1, metadata={"help": "Append a line to <output_dir>/log.jsonl every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})

    def __post_init__(self):
        self.text_encoder_out_layers = tuple(int(k) for k in self.text_encoder_out_layers)
        if self.num_steps < 2:
            raise ValueError("num_steps must be ≥ 2: the last step is a deterministic ODE step that is not trained")
        if self.group_size < 2:
            raise ValueError("group_size must be ≥ 2: advantages are relative to the group")
        if self.max_steps < 1 or self.groups_per_step < 1:
            raise ValueError("max_steps and groups_per_step must be ≥ 1")
        if self.noise_level <= 0:
            raise ValueError("noise_level must be > 0 for RL (the log-prob of an ODE step is undefined); try 0.7")
        if not 0.0 < self.train_timestep_fraction <= 1.0:
            raise ValueError("train_timestep_fraction must be in (0, 1]")
        if not 0.0 <= self.text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {self.text_weight}")
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ValueError("clip_range and adv_clip_max must be > 0")
        if self.beta < 0:
            raise ValueError("beta must be ≥ 0")
        if self.beta > 0 and self.lora_rank == 0:
            raise ValueError("beta > 0 needs lora_rank > 0: the KL reference is the adapter-disabled model")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be ≥ 0 (0 = full fine-tune)")
        if self.lora_rank and not self.lora_alpha:
            self.lora_alpha = 2.0 * self.lora_rank
        check_lora_targets(self.lora_target_modules)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use no, fp16 or bf16")

    @property
    def train_steps(self) -> list[int]:
        n_sde = self.num_steps - 1
        return list(range(max(1, int(round(n_sde * self.train_timestep_fraction)))))


@dataclass
class DistillConfig:
    """Trajectory (reflow) distillation into a few-step student."""

    output_dir: str = field(default="runs/distill", metadata={"help": "Diffusers folder (is_distilled=True) written at the end; checkpoints and teacher cache inside."})
    height: int = field(default=64, metadata={"help": "Resolution (pixels) of teacher samples and student training."})
    width: int = field(default=64, metadata={"help": "Resolution (pixels)."})
    student_steps: int = field(default=4, metadata={"help": "Steps the student is distilled to."})
    teacher_steps: int = field(default=32, metadata={"help": "Teacher Euler steps in all; a multiple of student_steps."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Teacher CFG scale (folded into the student)."})
    target: str = field(default="trajectory", metadata={"help": "trajectory (teacher segment velocities) | endpoint (k-step reflow)."})
    num_pairs: int = field(default=256, metadata={"help": "Teacher trajectories cached per process before training."})
    max_steps: int = field(default=1000, metadata={"help": "Student optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Cached trajectories per optimizer step per process (also the teacher batch)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant | constant_with_warmup | linear | cosine."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (fused at export, so the layout stays the same); 0 = full."})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha; 0 means 2 × rank."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over transformer module names for LoRA."})
    max_sequence_length: int = field(default=0, metadata={"help": "Text tokens per prompt (padded); 0 = the pipeline's own length, as the executor uses at inference."})
    text_encoder_out_layers: tuple[int, ...] = field(default=(9, 18, 27), metadata={"help": "Text-encoder hidden states stacked into the prompt embedding."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed for teacher noise and batch order."})
    checkpoint_every: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    log_every: int = field(default=10, metadata={"help": "Append a line to <output_dir>/log.jsonl every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint (and the cached teacher trajectories)."})

    def __post_init__(self):
        self.text_encoder_out_layers = tuple(int(k) for k in self.text_encoder_out_layers)
        if self.student_steps < 1:
            raise ValueError("student_steps must be ≥ 1")
        if self.teacher_steps < self.student_steps or self.teacher_steps % self.student_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of student_steps ({self.student_steps}), e.g. {8 * self.student_steps}")
        if self.target not in ("trajectory", "endpoint"):
            raise ValueError(f"target {self.target!r}: use trajectory or endpoint")
        if min(self.num_pairs, self.max_steps, self.batch_size) < 1:
            raise ValueError("num_pairs, max_steps and batch_size must be ≥ 1")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be ≥ 0 (0 = full fine-tune)")
        if self.lora_rank and not self.lora_alpha:
            self.lora_alpha = 2.0 * self.lora_rank
        check_lora_targets(self.lora_target_modules)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use no, fp16 or bf16")
