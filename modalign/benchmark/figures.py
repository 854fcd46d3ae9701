"""Figures with uncertainty: ``{"value", "ci_low", "ci_high", "n", "method"}``.

Every figure of a benchmark report is a :class:`Figure`. A *proportion* (a mean of 0/1
outcomes: accuracy, recall@k per query) gets the Wilson score interval, which stays valid at
the edges (355/355 -> [0.990, 1.000], where a bootstrap of a constant gives [1, 1]); it also
keeps its per-item outcomes (``outcomes``: hex of the packed bits) so that two models scored on
the same items can be compared with a paired test (:func:`mcnemar`). Any other mean (mAP, a
mean over seeds) gets the percentile bootstrap, which resamples the items the figure averages
over with a local ``np.random.Generator`` seeded from the suite (never the global RNG), so a
report is reproducible and leaves the process state alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Figure",
    "bootstrap",
    "bootstrap_mean",
    "mcnemar",
    "mean_of_seeds",
    "pack_outcomes",
    "proportion_figure",
    "unpack_outcomes",
    "wilson_interval",
]

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Figure:
    """A point estimate with its 95% interval, the number of items behind it, how the
    interval was made (``wilson`` or ``bootstrap``) and, for proportions, the per-item 0/1
    outcomes (packed hex) for paired tests."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str = "bootstrap"
    outcomes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
               "method": self.method}  # fmt: skip
        if self.outcomes is not None:
            out["outcomes"] = self.outcomes
        return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (valid at 0 and 1, unlike the bootstrap
    of a constant): 355/355 -> (0.9893, 1.0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _normal_quantile(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact to ~1e-12)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def pack_outcomes(outcomes: np.ndarray) -> str:
    """0/1 per item -> hex of the packed bits (item order kept; ``n`` says how many)."""
    return np.packbits(np.asarray(outcomes, dtype=bool)).tobytes().hex()


def unpack_outcomes(packed: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_outcomes`."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))[:n].astype(bool)


def proportion_figure(outcomes: np.ndarray) -> Figure:
    """Share of 1s among per-item 0/1 ``outcomes`` with its Wilson interval and the outcomes."""
    o = np.asarray(outcomes).reshape(-1)
    n, k = int(o.size), int(np.count_nonzero(o))
    if n == 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0, "wilson")
    low, high = wilson_interval(k, n)
    return Figure(k / n, low, high, n, "wilson", pack_outcomes(o))


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test of two 0/1 outcome vectors on the same items: the discordant counts
    (a right, b wrong), (a wrong, b right) and the two-sided p-value."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same items: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
    m = only_a + only_b
    if m == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return only_a, only_b, min(1.0, 2 * tail)


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
    """Mean of per-item values with its 95% interval: per-item 0/1 outcomes (correctness,
    recall@k per query) are a proportion and get :func:`proportion_figure` (Wilson); any other
    values (per-query AP, means over seeds) the percentile bootstrap.

    Vectorised: the resampled means come from one ``(resamples, n)`` index draw in blocks.
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    n = v.size
    if n == 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0)
    if np.all((v == 0) | (v == 1)):  # a mean of 0/1 outcomes is a binomial proportion
        return proportion_figure(v == 1)
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
    """An accuracy over ``n`` items (per-item outcomes unknown) with its Wilson interval."""
    if n <= 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0, "wilson")
    correct = round(accuracy * n)
    low, high = wilson_interval(correct, n)
    return Figure(correct / n, low, high, n, "wilson")


__all__ += ["accuracy_figure"]
