"""Bootstrap intervals for the difference of two pass rates: paired (same units) or independent.

Paired: both rows were scored on the same units (prompt × seed), and whole units are resampled, so a
prompt that is hard for both rows counts once. Independent: each row's units are resampled on their
own (edit success, where each model's own canvases decide which edits are asked). The interval is the
percentile interval of the resampled mean difference; README's intervals used 2,000 resamples, seed 0.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np

RESAMPLES = 2000


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict:
    """``mean(b) − mean(a)`` with its percentile interval; ``a[i]`` and ``b[i]`` are the same unit."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired samples need two equal, non-empty 1-d lists, got {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return _interval(float(d.mean()), means, level, n=len(d), paired=True)


def independent_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                          level: float = 0.95) -> dict:
    """``mean(b) − mean(a)`` with its percentile interval, each sample resampled on its own."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("each sample needs at least one unit")
    rng = np.random.default_rng(seed)
    means = (b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
             - a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1))
    return _interval(float(b.mean() - a.mean()), means, level, n=(len(a), len(b)), paired=False)


def paired_units(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list[float], list[float]]:
    """The two rows' values on their common units, in one order; a unit only one row has is an error
    (the rows were not measured on the same prompts and seeds)."""
    if set(a) != set(b):
        only = sorted(map(str, set(a) ^ set(b)))[:3]
        raise ValueError(f"the rows were not measured on the same units (e.g. {', '.join(only)}); "
                         "measure both with the same n and seeds")
    keys = sorted(a, key=str)
    return [a[k] for k in keys], [b[k] for k in keys]


def _interval(diff: float, means: np.ndarray, level: float, **info) -> dict:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "level": level, "resamples": len(means), **info}
