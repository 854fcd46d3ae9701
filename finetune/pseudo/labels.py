"""Pseudo-label results shared by every labeler: :class:`PseudoLabels` and :data:`NO_LABEL`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


__all__ = ["NO_LABEL", "PseudoLabels", "from_probs"]
