"""The fields and checks every trainer shares (trl's ``TrainingArguments`` is the model).

Torch-free, so ``clvr train`` builds its flags from these dataclasses without importing a model stack.
A stage config subclasses ``TrainConfig``, redeclares a field to change its default or help, and calls
``super().__post_init__()`` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Output, optimisation, LoRA, precision, seed, checkpoints and logging."""

    output_dir: str = field(default="runs/train", metadata={"help": "Output folder: the trained model at the end, checkpoints under <output_dir>/checkpoints."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate."})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant | constant_with_warmup | linear | cosine (one step per optimizer step, whatever the number of processes)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tune."})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha; 0 means 2 × rank."})
    lora_target_modules: str = field(default="", metadata={"help": "Regex over module names for LoRA."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate)."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise and dropout."})
    checkpoint_every: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep (0 = all)."})
    log_every: int = field(default=10, metadata={"help": "Append a line to <output_dir>/log.jsonl every N steps (0 = never)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler {self.lr_scheduler!r}: use {', '.join(LR_SCHEDULES[:-1])} or {LR_SCHEDULES[-1]}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps, weight_decay and max_grad_norm must be ≥ 0")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be ≥ 0 (0 = full fine-tune)")
        if self.lora_rank and not self.lora_alpha:
            self.lora_alpha = 2.0 * self.lora_rank
        try:
            re.compile(self.lora_target_modules)
        except re.error as exc:
            raise ValueError(f"lora_target_modules is not a valid regular expression ({exc}); pass a regex over module names") from None
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use no, fp16 or bf16")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 0 or self.log_every < 0:
            raise ValueError("checkpoint_every, keep_checkpoints and log_every must be ≥ 0")

    def check_batch(self, batch_size: int, gradient_accumulation_steps: int = 1) -> None:
        """``batch_size`` examples per step per process, split into ``gradient_accumulation_steps`` micro-batches."""
        if batch_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be ≥ 1")
        if batch_size % gradient_accumulation_steps:
            raise ValueError(f"batch_size {batch_size} must be a multiple of gradient_accumulation_steps {gradient_accumulation_steps}")
