"""Evaluating a fusion head on an :class:`EmbeddedSet`: accuracy, macro-F1, per-subset accuracy."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from modalign.core.errors import UserInputError
from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.head_base import FusionHead
from modalign.finetune.metrics import classification_metrics
from modalign.finetune.pseudo.labels import NO_LABEL


@torch.no_grad()
def predict(head: FusionHead, s: EmbeddedSet, drop: Sequence[str] = ()) -> torch.Tensor:
    """Logits ``(N, C)`` of ``head`` on ``s`` in eval mode, with modalities ``drop`` hidden."""
    head.eval()
    present = {m: (torch.zeros_like(p) if m in drop else p) for m, p in s.present.items()}
    return head(s.x, present)


def subsets(inputs: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``inputs`` (names sorted), largest first."""
    mods = sorted(inputs)
    return [c for r in range(len(mods), 0, -1) for c in itertools.combinations(mods, r)]


def evaluate_head(
    head: FusionHead, s: EmbeddedSet, num_classes: int, drop: Sequence[str] = ()
) -> dict[str, Any]:
    """Accuracy/macro-F1/confusion with ``drop`` removed, plus accuracy for each modality subset.

    ``by_subset`` keys are modality names sorted and joined by '+'; a subset is evaluated on the
    rows that have all of its modalities, with the others hidden from the head.
    """
    labeled = s.y != NO_LABEL
    if not bool(labeled.any()):
        raise UserInputError("evaluation data has no labels")
    s = s.subset(labeled.nonzero().flatten())
    out = classification_metrics(s.y.numpy(), predict(head, s, drop).argmax(1).numpy(), num_classes)
    by_subset = {}
    for subset in subsets([m for m in s.x if m not in drop]):
        rows = torch.stack([s.present[m] for m in subset]).all(0)
        if not bool(rows.any()):
            continue
        part = s.subset(rows.nonzero().flatten())
        hidden = [m for m in s.x if m not in subset]
        by_subset["+".join(subset)] = float(
            (predict(head, part, hidden).argmax(1) == part.y).float().mean()
        )
    out["by_subset"] = by_subset
    out["items"] = len(s)
    return out


__all__ = ["evaluate_head", "predict", "subsets"]
