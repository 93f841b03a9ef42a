"""The one seed formula: every derived seed (a loop step's, an eval prompt's, a shuffle's) comes from here.

``derive_seed(seed, a, b, …)`` folds the parts in order, so ``derive_seed(seed, i)`` is the seed of
item ``i`` under base seed ``seed``, whatever the shard, resume or run order, and distinct across
base seeds and items. Results stay in ``[0, 2**31 - 1)`` (valid for numpy, torch and PIL alike).
"""

from __future__ import annotations

_MODULUS = 2**31 - 1


def derive_seed(seed: int, *parts: int) -> int:
    value = seed % _MODULUS
    for part in parts:
        value = (value * 1_000_003 + int(part) * 7919) % _MODULUS
    return value


def step_seed(run_seed: int, index: int) -> int:
    """The executor seed of a run's step ``index``; a single-step baseline draws with ``step_seed(seed, 0)``,
    the loop's own first draw, so the two are paired."""
    return derive_seed(run_seed, index)
