"""What the PPRL tests share: a reward that needs no model, and one small trainer config."""

from __future__ import annotations

import numpy as np

H = W = 16  # tiny VAE downsamples by 2 and packs 2×2: 16 px -> 4×4 = 16 target tokens
SEQ = 64  # byte-level tokenizer: the chat template alone is ~35 tokens


def brightness(images, proxies):
    """Mean brightness in [0, 1]: a reward any tiny pipeline can move."""
    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]


def pprl_config(tmp_path, **kw):
    """A PPRLConfig for the tiny pipelines, output under ``tmp_path/pprl``; ``kw`` overrides."""
    from clvr_agent.training.pprl import PPRLConfig

    base = dict(output_dir=str(tmp_path / "pprl"), height=H, width=W, num_steps=3, group_size=4, groups_per_step=2,
                lora_rank=4, max_sequence_length=SEQ, text_weight=1.0, checkpoint_every=0, log_every=0)
    return PPRLConfig(**{**base, **kw})
