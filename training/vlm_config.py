"""The config of ``clvr train sft-vlm`` (torch-free, so the CLI builds its flags without a model stack)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clvr_agent.training.base_config import TrainConfig

# Attention and MLP projections of the language model (the vision tower and merger stay as they are).
LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


@dataclass
class SFTVLMConfig(TrainConfig):
    """Supervised fine-tuning of the Qwen3-VL controller on verified trajectories (assistant-only loss)."""

    output_dir: str = field(default="runs/sft-vlm", metadata={"help": "Model folder written at the end (LoRA merged); checkpoints under <output_dir>/checkpoints."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "constant | constant_with_warmup | linear | cosine (one step per optimizer step, whatever the number of processes)."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the language model's projections; 0 = full fine-tune."})
    lora_target_modules: str = field(default=LORA_TARGET_MODULES, metadata={"help": "Regex over module names for LoRA."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and dropout."})
    dialogue: str = field(default="calls", metadata={"help": "calls: one conversation per controller call, exactly as the controller sends it at inference; trajectory: one interleaved multi-turn dialogue per trajectory."})
    batch_size: int = field(default=4, metadata={"help": "Conversations per optimizer step per process (split into micro-batches)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    train_vision: bool = field(default=False, metadata={"help": "Full fine-tune only: also train the vision tower and merger."})
    image_size: int = field(default=512, metadata={"help": "Longer side of each canvas before the processor (the controller's image_size)."})
    history_token_budget: int = field(default=2048, metadata={"help": "The controller's history_token_budget for the 'Steps so far' text."})
    history_images: int = field(default=2, metadata={"help": "The controller's history_images (used by dialogue='calls')."})
    share_prefix: bool = field(default=True, metadata={"help": "Run the system text the conversations of a micro-batch share once (same loss and gradients; micro-batches are grouped by system text). Single process only."})
    encode_cache_mb: int = field(default=2048, metadata={"help": "Memory for tokenized conversations kept from one epoch to the next (the rest are rendered again); 0 = off."})
    max_length: int = field(default=32768, metadata={"help": "Longest conversation in tokens; a longer one is an error, never cut."})

    def __post_init__(self):
        super().__post_init__()
        if self.dialogue not in ("trajectory", "calls"):
            raise ValueError(f"dialogue {self.dialogue!r}: use 'trajectory' (multi-turn) or 'calls' (one per controller call)")
        self.check_batch(self.batch_size, self.gradient_accumulation_steps)
        if self.lora_rank and self.train_vision:
            raise ValueError("train_vision applies to a full fine-tune: drop train_vision or set lora_rank 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.encode_cache_mb < 0:
            raise ValueError(f"encode_cache_mb must be >= 0 (0 turns the cache off), got {self.encode_cache_mb}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be at least 16 tokens, got {self.max_length}")
