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
    from colour_shape import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--run", default=None)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sigmas", default="0.5,0.7,0.85,0.95")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG: columns are records, rows are σ")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    sigmas = [float(s) for s in a.sigmas.split(",")]
    if not all(0.0 < s <= 1.0 for s in sigmas):
        p.error(f"--sigmas must lie in (0, 1], got {a.sigmas}")
    pipe, step = load(a.model, a.run)
    recs = [json.loads(ln) for ln in a.data.read_text().splitlines() if ln.strip()][: a.n]
    images = [Image.open(a.data.parent / r["target"]).convert("RGB") for r in recs]
    prompts = [r["prompt"] for r in recs]
    x0, ids = fm.pack_target(pipe, fm.encode_images(pipe, fm.to_pixels(pipe, images, a.size, a.size)))
    embeds, _ = pipe.encode_prompt(prompt=prompts, device=x0.device, num_images_per_prompt=1,
                                   max_sequence_length=prompt_max_length(pipe))
    cond = fm.Condition(embeds, pipe._prepare_text_ids(embeds).to(x0.device))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.seed)).to(x0)
    rows = [fm.decode_tokens(pipe, x0, ids, a.size, a.size)]
    for s in sigmas:
        xt = (1 - s) * x0 + s * noise
        v = fm.velocity(pipe.transformer, xt, ids, torch.full((len(recs),), s, device=x0.device), cond)
        rows.append(fm.decode_tokens(pipe, xt - s * v, ids, a.size, a.size))
    sheet = Image.new("RGB", (a.size * len(recs), a.size * len(rows)))
    for j, row in enumerate(rows):
        for i, im in enumerate(row):
            sheet.paste(im, (i * a.size, j * a.size))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(json.dumps({"model": a.model, "run": a.run, "step": step, "rows": ["vae"] + sigmas, "prompts": prompts,
                      "out": str(a.out)}))


if __name__ == "__main__":
    main()
