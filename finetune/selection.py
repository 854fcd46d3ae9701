"""Choosing which pseudo-labels to train on (class balance) and reporting on a selection."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.finetune.labels import PseudoLabels


def balance_classes(
    pl: PseudoLabels,
    num_classes: int,
    max_per_class: int | None = None,
    ratio: float | None = 1.0,
    eligible: Tensor | None = None,
) -> Tensor:
    """Select the most confident rows of each class so no class dominates; returns ``(N,)`` bool.

    Candidates are rows with a label (and ``eligible``, e.g. a threshold mask, when given). Each
    class keeps at most ``min(max_per_class, floor(ratio * n_min))`` rows, where ``n_min`` is the
    candidate count of the smallest non-empty class; a ``None`` limit is ignored. Ties in
    confidence go to the lower row index.
    """
    if max_per_class is not None and max_per_class < 0:
        raise UserInputError(f"max_per_class must be >= 0, got {max_per_class}")
    if ratio is not None and ratio <= 0:
        raise UserInputError(f"ratio must be > 0, got {ratio}")
    labels, conf = pl.labels, pl.confidence
    candidates = (labels >= 0) & (labels < num_classes)
    if eligible is not None:
        candidates &= eligible.to(torch.bool)
    counts = torch.bincount(labels[candidates], minlength=num_classes)
    cap = _class_cap(counts, max_per_class, ratio)
    selected = torch.zeros_like(candidates)
    for c in range(num_classes):
        rows = torch.nonzero(candidates & (labels == c)).squeeze(1)
        if rows.numel() == 0 or cap == 0:
            continue
        order = torch.argsort(conf[rows], descending=True, stable=True)
        selected[rows[order[:cap]]] = True
    return selected


def _class_cap(counts: Tensor, max_per_class: int | None, ratio: float | None) -> int:
    nonempty = counts[counts > 0]
    cap = int(counts.max()) if nonempty.numel() else 0
    if ratio is not None and nonempty.numel():
        cap = min(cap, max(1, math.floor(ratio * int(nonempty.min()))))
    if max_per_class is not None:
        cap = min(cap, max_per_class)
    return cap


def pseudo_label_report(
    pl: PseudoLabels,
    selected: Tensor,
    true_labels: Tensor | None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Summarise a selection of pseudo-labels (plain Python values, JSON-ready).

    Keys: ``num_rows``, ``num_selected``, ``coverage`` (fraction selected), ``accuracy`` of selected
    rows against ``true_labels`` (rows with a negative true label are unknown and skipped; ``None``
    when no selected row has a known true label), ``mean_confidence`` of selected rows (``None``
    when empty), ``per_class_counts`` (selected rows per pseudo-class).
    """
    selected = selected.to(torch.bool)
    if tuple(selected.shape) != tuple(pl.labels.shape):
        raise UserInputError(
            f"selected mask shape {tuple(selected.shape)} != labels {tuple(pl.labels.shape)}"
        )
    n, chosen = pl.labels.shape[0], selected & (pl.labels >= 0)
    if num_classes is None:
        num_classes = _infer_num_classes(pl)
    counts = torch.bincount(pl.labels[chosen], minlength=num_classes)
    return {
        "method": pl.method,
        "num_rows": n,
        "num_selected": int(chosen.sum()),
        "coverage": float(chosen.sum()) / n if n else 0.0,
        "accuracy": _selected_accuracy(pl.labels, chosen, true_labels),
        "mean_confidence": float(pl.confidence[chosen].mean()) if chosen.any() else None,
        "per_class_counts": counts.tolist(),
    }


def _infer_num_classes(pl: PseudoLabels) -> int:
    if pl.probs is not None:
        return int(pl.probs.shape[1])
    return int(pl.labels.max()) + 1 if pl.labels.numel() else 0


def _selected_accuracy(labels: Tensor, chosen: Tensor, true_labels: Tensor | None) -> float | None:
    if true_labels is None:
        return None
    true_labels = true_labels.to(labels.device)
    known = chosen & (true_labels >= 0)
    if not known.any():
        return None
    return float((labels[known] == true_labels[known]).float().mean())


__all__ = ["balance_classes", "pseudo_label_report"]
