"""Where does clvr-mini decide a shape? Its clean-image guesses x̂0 = x_σ − σ·v at several noise levels.

For the first ``--n`` records of a clvr-mini JSONL: row 0 is the VAE round trip of each training image,
then one row per σ in ``--sigmas`` with the transformer's one-step guess of the clean image from the
noised latent (fixed noise, the record's own prompt). Shapes that survive to the highest σ row are
decided by the text; shapes that only appear in lower rows are read off the noisy canvas.

  python scripts/clvr_mini/x0_by_sigma.py --model clvr_mini_work/base2 [--run RUN] \
      --data clvr_mini_work/data_centre/data.jsonl --out x0.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from PIL import Image

    from clvr_agent.tools.flux2_klein import prompt_max_length
    from clvr_agent.training import flow_matching as fm
    from colour_shape import add_batch_args, load, training_batch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(p, n=8, sigmas="0.5,0.7,0.85,0.95")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG: columns are records, rows are σ")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    sigmas = [float(s) for s in a.sigmas.split(",")]
    if not all(0.0 < s <= 1.0 for s in sigmas):
        p.error(f"--sigmas must lie in (0, 1], got {a.sigmas}")
    pipe, step = load(a.model, a.run)
    prompts, x0, ids = training_batch(pipe, a.data, a.n, a.size)
    cond = fm.Condition(*fm.encode_text(pipe, prompts, max_sequence_length=prompt_max_length(pipe)))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.seed))
    rows = [fm.decode_tokens(pipe, x0, ids, a.size, a.size)]
    for s in sigmas:
        sigma = torch.full((len(prompts),), s)
        x_t, _ = fm.noisy_target(x0, noise, sigma)
        rows.append(fm.decode_tokens(pipe, x_t - s * fm.velocity(pipe.transformer, x_t, ids, sigma, cond), ids, a.size, a.size))
    n = len(prompts)
    sheet = Image.new("RGB", (a.size * n, a.size * len(rows)))
    for j, row in enumerate(rows):
        for i, im in enumerate(row):
            sheet.paste(im, (i * a.size, j * a.size))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(json.dumps({"model": a.model, "run": a.run, "step": step, "rows": ["vae"] + sigmas, "prompts": prompts,
                      "out": str(a.out)}))


if __name__ == "__main__":
    main()
