"""GenEval on real images: generate the official prompts into GenEval's folder layout, then score them.

Layout (the official one, so the mmdet evaluator can score the same folder)::

    OUT/00000/metadata.jsonl      one JSON line: the prompt's clauses
    OUT/00000/samples/0000.png    sample 0 … N-1
    OUT/results.jsonl             official fields: filename, tag, prompt, correct, reason (+ metadata, details)
    OUT/summary.json              geneval.summarize (per-tag means, their unweighted mean) + counts

Generation is resumable (an existing sample is never redrawn; a sample is written to a temporary
name and renamed, so an interrupted write leaves nothing) and shardable: prompt i belongs to shard
``i % n``; shards write disjoint prompt folders of one OUT, so they merge by construction. Sample j of
prompt i always gets seed ``prompt_seed(seed, i, j)`` (:mod:`clvr_agent.eval.sampling`), whatever the
shard, resume or run order; samplers are that module's ``single_step`` and ``loop``.
Scoring reuses :mod:`clvr_agent.eval.rules`, the one implementation of the official rules.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from PIL import Image, ImageOps

from clvr_agent.eval.sampling import Sampler, prompt_seed
from clvr_agent.eval.rules import ColorFn, Detection, evaluate_image, load_official_metadata, select_detections, summarize

Detector = Callable[[Image.Image], list[Detection]]
# colors_for(image) -> classify_color for that image (CLIP on masked crops); None when detections carry colour.
ColorsFor = Callable[[Image.Image], ColorFn]

MAX_SAMPLES = 1000


def prompt_dir(out: Path, index: int) -> Path:
    return Path(out) / f"{index:05d}"


def sample_path(out: Path, index: int, j: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{j:04d}.png"


def shard_indices(n_prompts: int, limit: Optional[int] = None, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The prompt indices shard ``k`` of ``n`` owns among the first ``limit`` prompts."""
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: need 0 <= K < N")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    count = n_prompts if limit is None else min(limit, n_prompts)
    return [i for i in range(count) if i % n == k]


def _write_metadata(folder: Path, metadata: dict) -> None:
    path = folder / "metadata.jsonl"
    if path.exists():
        if json.loads(path.read_text()) != metadata:
            raise ValueError(f"{path} holds a different prompt; --out must be a folder of the same prompt set")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata) + "\n")


def generate_geneval(
    out: Path,
    make_sampler: Callable[[], Sampler],
    *,
    samples: int = 4,
    limit: Optional[int] = None,
    shard: tuple[int, int] = (0, 1),
    seed: int = 0,
    metadata: Optional[Sequence[dict]] = None,
    on_sample: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Draw every missing sample of this shard's prompts; returns counts ``generated`` / ``skipped``.

    ``make_sampler`` is called only when the first missing sample is found, so a finished folder
    loads no generator.
    """
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    metadata = list(metadata) if metadata is not None else load_official_metadata()
    indices = shard_indices(len(metadata), limit, shard)
    sampler: Optional[Sampler] = None
    generated = skipped = 0
    for index in indices:
        folder = prompt_dir(out, index)
        _write_metadata(folder, metadata[index])
        (folder / "samples").mkdir(exist_ok=True)
        for j in range(samples):
            path = sample_path(out, index, j)
            if path.exists():
                skipped += 1
                continue
            sampler = sampler or make_sampler()
            image = sampler(metadata[index]["prompt"], prompt_seed(seed, index, j)).image
            if image is None:
                raise RuntimeError(f"prompt {index} sample {j}: the loop produced no image")
            tmp = folder / f".{j:04d}.partial"  # outside samples/: no scorer ever globs it
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            generated += 1
            if on_sample is not None:
                on_sample(index, j)
    return {"prompts": len(indices), "generated": generated, "skipped": skipped}


def iter_samples(images_dir: Path) -> Iterator[tuple[dict, str]]:
    """(metadata, image path) for every ``NNNNN/samples/N.png``, in folder and file order."""
    root = str(images_dir)
    for sub in sorted(os.listdir(root)):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        names = sorted(n for n in os.listdir(os.path.join(folder, "samples")) if re.fullmatch(r"\d+\.png", n))
        for name in names:
            yield metadata, os.path.join(folder, "samples", name)


def score_folder(
    images_dir: Path, out_dir: Path, detect: Detector, colors_for: Optional[ColorsFor] = None, **about
) -> dict:
    """Score a GenEval-layout folder → ``out_dir/results.jsonl`` and ``summary.json``; returns the summary."""
    results = []
    for metadata, path in iter_samples(images_dir):
        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        detections = detect(image)
        classify = colors_for(image) if colors_for is not None else None
        correct, reason = evaluate_image(metadata, detections, classify)
        kept = select_detections(metadata["tag"], detections)
        results.append({
            "filename": path, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": reason, "metadata": json.dumps(metadata),
            "details": json.dumps({c: [[*d.box, d.score] for d in ds] for c, ds in kept.items()}),
        })
    if not results:
        raise ValueError(f"{images_dir} has no NNNNN/samples/N.png images with a metadata.jsonl")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w") as fp:
        for r in results:
            fp.write(json.dumps(r) + "\n")
    summary = summarize(results)
    folders = {os.path.dirname(os.path.dirname(r["filename"])) for r in results}
    summary.update(images=len(results), prompts=len(folders), **about)  # ``about``: e.g. detector="shapeworld"
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def mask2former_scorer(detector_model: str, clip_model: str, *, device: Optional[str] = None,
                       dtype: str = "float32") -> tuple[Detector, ColorsFor]:
    """The real-image detector and colour classifier, loaded once."""
    from clvr_agent.tools.clip_color import ClipColorClassifier
    from clvr_agent.tools.mask2former_detector import Mask2FormerDetector

    detector = Mask2FormerDetector.from_pretrained(detector_model, device=device, dtype=dtype)
    colors = ClipColorClassifier.from_pretrained(clip_model, device=device, dtype=dtype)
    return detector, colors.for_image
