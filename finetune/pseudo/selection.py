"""Choosing which pseudo-labels to train on (class balance) and reporting on a selection."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.finetune.pseudo.labels import PseudoLabels


def balance_classes(
    pl: PseudoLabels,
    num_classes: int,
    max_per_class: int | None = None,
    ratio: float | None = 1.0,
    eligible: Tensor | None = None,
    labeled_counts: Tensor | None = None,
) -> Tensor:
    """Select the most confident rows of each class so no class dominates; returns ``(N,)`` bool.

    Candidates are rows with a label (and ``eligible``, e.g. a threshold mask, when given).
    Without ``labeled_counts``, each class keeps at most ``min(max_per_class, floor(ratio *
    n_min))`` rows, where ``n_min`` is the candidate count of the smallest non-empty class; a
    ``None`` limit is ignored.

    With ``labeled_counts`` ``(C,)`` (the labeled rows per class the pseudo-labels will join),
    balance is judged over that training set: class ``c`` ends with at most
    ``cap = floor(ratio * min_c(labeled_c + candidates_c))`` rows in total (labeled plus pseudo),
    so it keeps ``cap - labeled_c`` pseudo-labels (``max_per_class`` still limits pseudo-labels).
    Four labels per class plus nineteen pseudo-labels of one class can therefore no longer
    happen: with ``ratio`` 1.5 that class keeps two. Ties in confidence go to the lower row index.
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
    if labeled_counts is None:
        caps = [_class_cap(counts, max_per_class, ratio)] * num_classes
    else:
        caps = _training_set_caps(counts, labeled_counts, num_classes, max_per_class, ratio)
    selected = torch.zeros_like(candidates)
    for c in range(num_classes):
        rows = torch.nonzero(candidates & (labels == c)).squeeze(1)
        if rows.numel() == 0 or caps[c] <= 0:
            continue
        order = torch.argsort(conf[rows], descending=True, stable=True)
        selected[rows[order[: caps[c]]]] = True
    return selected


def _training_set_caps(
    counts: Tensor,
    labeled_counts: Tensor,
    num_classes: int,
    max_per_class: int | None,
    ratio: float | None,
) -> list[int]:
    """Pseudo-labels each class may add so the training set (labels + them) stays balanced."""
    lab = labeled_counts.to(torch.long).cpu()
    if tuple(lab.shape) != (num_classes,) or bool((lab < 0).any()):
        raise UserInputError(
            f"labeled_counts must be {num_classes} non-negative counts, got {lab.tolist()}"
        )
    totals = lab + counts.cpu()
    cap_total = int(totals.min())
    if ratio is not None:
        cap_total = max(int(lab.max()), math.floor(ratio * cap_total))
    caps = [max(0, cap_total - int(lab[c])) for c in range(num_classes)]
    if max_per_class is not None:
        caps = [min(c, max_per_class) for c in caps]
    return caps


def soft_weights(confidence: Tensor, rows: Tensor) -> Tensor:
    """SoftMatch-style weights (Chen et al. 2023) for pseudo-labels instead of a hard cut.

    With ``mu`` and ``sigma^2`` the mean and variance of ``confidence`` over the selected
    ``rows`` (bool mask), a row at or above ``mu`` weighs 1 and one below weighs
    ``exp(-(c - mu)^2 / (2 sigma^2))``; unselected rows weigh 0. (SoftMatch tracks ``mu`` and
    ``sigma`` with an EMA over batches; on cached embeddings the whole pool is one batch.)
    """
    rows = rows.to(torch.bool)
    weights = torch.zeros_like(confidence, dtype=torch.float32)
    if not rows.any():
        return weights
    conf = confidence.float()
    chosen = conf[rows]
    mu = chosen.mean()
    var = chosen.var(unbiased=False).clamp(min=1e-12)
    gauss = torch.exp(-((conf - mu) ** 2) / (2 * var))
    w = torch.where(conf >= mu, torch.ones_like(conf), gauss)
    return torch.where(rows, w, weights)


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


__all__ = ["balance_classes", "pseudo_label_report", "soft_weights"]
