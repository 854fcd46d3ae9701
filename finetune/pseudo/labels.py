"""Pseudo-label results shared by every labeler: :class:`PseudoLabels` and :data:`NO_LABEL`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modalign.core.errors import UserInputError

NO_LABEL = -1


@dataclass
class PseudoLabels:
    """Per-row pseudo-labels.

    ``labels`` (N,) long, ``NO_LABEL`` where no prediction is possible; ``confidence`` (N,) in
    [0, 1]; ``method`` names the labeler; ``probs`` (N, C) are the class probabilities when the
    labeler has them.
    """

    labels: Tensor
    confidence: Tensor
    method: str
    probs: Tensor | None = None


def from_probs(probs: Tensor, labeled: Tensor, confidence: Tensor, method: str) -> PseudoLabels:
    labels = torch.where(
        labeled, probs.argmax(dim=1), torch.full_like(labeled, NO_LABEL, dtype=torch.long)
    )
    confidence = torch.where(labeled, confidence.clamp(0.0, 1.0), torch.zeros_like(confidence))
    return PseudoLabels(labels=labels, confidence=confidence, method=method, probs=probs)


def check_seed_rows(
    method: str, unlabeled: Tensor, labeled: Tensor, labels: Tensor, num_classes: int
) -> None:
    """UserInputError (naming ``method``) unless ``unlabeled`` (N, D) and ``labeled`` (L, D)
    share ``D``, there is one label per labeled row (at least one), and every label lies in
    ``[0, num_classes)``: what every labeler that starts from labeled rows takes."""
    if unlabeled.dim() != 2 or labeled.dim() != 2 or unlabeled.shape[1] != labeled.shape[1]:
        raise UserInputError(
            f"{method}: need (N, D) and (L, D) features, got {tuple(unlabeled.shape)} "
            f"and {tuple(labeled.shape)}"
        )
    if labeled.shape[0] < 1 or tuple(labels.shape) != (labeled.shape[0],):
        raise UserInputError(f"{method}: need at least one labeled row and one label per row")
    if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise UserInputError(f"{method}: labels must lie in [0, {num_classes})")


__all__ = ["NO_LABEL", "PseudoLabels", "check_seed_rows", "from_probs"]
