"""Figures with uncertainty: ``{"value", "ci_low", "ci_high", "n"}`` from a percentile bootstrap.

Every figure of a benchmark report is a :class:`Figure`. The bootstrap resamples the items the
figure averages over (queries, test items) with a local ``np.random.Generator`` seeded from the
suite (never the global RNG), so a report is reproducible and leaves the process state alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Figure", "bootstrap", "bootstrap_mean", "mean_of_seeds"]

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Figure:
    """A point estimate with its 95% bootstrap interval and the number of items behind it."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def bootstrap(
    stat: Callable[[np.ndarray], float],
    n: int,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> Figure:
    """``stat(indices)`` on all ``n`` items and on ``resamples`` bootstrap draws of them.

    The interval is the percentile interval of the resampled statistics, widened to include the
    point estimate (a skewed statistic such as ECE can sit just outside its percentile band).
    """
    if n <= 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0)
    gen = np.random.default_rng(seed)
    value = float(stat(np.arange(n)))
    draws = np.array([stat(gen.integers(0, n, size=n)) for _ in range(resamples)], dtype=float)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Figure(value, float(min(low, value)), float(max(high, value)), n)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, seed: int = 0, resamples: int = DEFAULT_RESAMPLES
) -> Figure:
    """Mean of per-item values (0/1 correctness, per-query AP...) with its bootstrap interval.

    Vectorised: the resampled means come from one ``(resamples, n)`` index draw in blocks.
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    n = v.size
    if n == 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0)
    gen = np.random.default_rng(seed)
    means = []
    block = max(1, (1 << 22) // n)
    for start in range(0, resamples, block):
        idx = gen.integers(0, n, size=(min(block, resamples - start), n))
        means.append(v[idx].mean(axis=1))
    draws = np.concatenate(means)
    value = float(v.mean())
    low, high = np.quantile(draws, [0.025, 0.975])
    return Figure(value, float(min(low, value)), float(max(high, value)), n)


def mean_of_seeds(per_seed: Sequence[np.ndarray], seed: int = 0) -> Figure:
    """Per-item values averaged over training seeds, then bootstrapped over items."""
    stacked = np.stack([np.asarray(p, dtype=float) for p in per_seed])
    return bootstrap_mean(stacked.mean(axis=0), seed=seed)


def accuracy_figure(accuracy: float, n: int, seed: int = 0) -> Figure:
    """The bootstrap of a 0/1 correctness vector depends only on (correct, n): rebuild it."""
    correct = round(accuracy * n)
    return bootstrap_mean(np.r_[np.ones(correct), np.zeros(n - correct)], seed=seed)


__all__ += ["accuracy_figure"]
