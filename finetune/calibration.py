"""Calibration of a classifier: expected calibration error and reliability-diagram bins."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expected_calibration_error", "reliability_bins"]


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)


def expected_calibration_error(confidence: Any, correct: Any, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of
    ``|bin| / n * |accuracy(bin) - mean confidence(bin)|``."""
    c = np.asarray(confidence, dtype=float)
    k = np.asarray(correct, dtype=float)
    if c.shape != k.shape or c.ndim != 1:
        raise ValueError(f"confidence {c.shape} and correct {k.shape} must be equal 1-D shapes")
    if not c.size:
        return float("nan")
    idx = _bin_index(c, bins)
    conf_sum = np.bincount(idx, weights=c, minlength=bins)
    acc_sum = np.bincount(idx, weights=k, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / c.size)


def reliability_bins(confidence: Any, correct: Any, bins: int = 15) -> list[dict[str, float]]:
    """Per non-empty bin: its range, item count, mean confidence and accuracy."""
    c = np.asarray(confidence, dtype=float)
    k = np.asarray(correct, dtype=float)
    idx = _bin_index(c, bins)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "count": int(sel.sum()),
                    "confidence": float(c[sel].mean()),
                    "accuracy": float(k[sel].mean()),
                }
            )
    return out
