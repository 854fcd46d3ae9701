"""Calibrated few-shot scores on cached embeddings: temperatures fitted on the labeled rows,
class prototypes with leave-one-out, and the zero-shot + few-shot interpolation
(Tip-Adapter / LP++ / WiSE-FT style) used by the ``zero_shot_mix`` labeler.

Every fit uses only the labeled rows; nothing here draws random numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.finetune.embedded import EmbeddedSet, fused_embedding
from modalign.finetune.pseudo.labels import PseudoLabels, from_probs

_TEMPERATURES = torch.logspace(-3.0, 0.5, 36)
_MIXES = torch.linspace(0.0, 1.0, 11)


def fit_temperature(scores: Tensor, y: Tensor, grid: Tensor | None = None) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(scores / T)`` on labels ``y``.

    ``scores`` ``(N, C)`` are e.g. cosine similarities; ``grid`` defaults to 36 log-spaced values
    in ``[1e-3, 10 ** 0.5]`` (ties keep the smaller ``T``). Needs at least one row.
    """
    if scores.dim() != 2 or tuple(y.shape) != (scores.shape[0],) or scores.shape[0] < 1:
        raise UserInputError(
            f"fit_temperature: need (N, C) scores and N labels with N >= 1, got "
            f"{tuple(scores.shape)} and {tuple(y.shape)}"
        )
    grid = _TEMPERATURES if grid is None else grid
    nll = torch.stack(
        [F.cross_entropy(scores.float() / float(t), y, reduction="mean") for t in grid]
    )
    return float(grid[int(torch.argmin(nll))])


def prototypes(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """L2-normalised class means ``(C, D)`` of the rows ``x`` (a class with no row gets zeros)."""
    sums = torch.zeros(num_classes, x.shape[1]).index_add_(0, y, x.float())
    return F.normalize(sums, dim=1)


def leave_one_out_scores(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Cosine scores of each labeled row to the class prototypes computed without that row.

    Returns ``(scores (N, C), valid (N,))``: ``valid`` is False for a row that is the only label
    of its class (its class has no prototype left, so the row cannot be held out).
    """
    x = x.float()
    sums = torch.zeros(num_classes, x.shape[1]).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes)
    own = sums[y] - x  # the row's own class mean without it
    protos = F.normalize(sums, dim=1)
    scores = x @ protos.T
    own_scores = (x * F.normalize(own, dim=1)).sum(dim=1)
    scores[torch.arange(len(y)), y] = own_scores
    return scores, counts[y] > 1


def mix_zero_and_few_shot(
    labeled: EmbeddedSet,
    pool: EmbeddedSet,
    class_text: Tensor,
    mix: float = -1.0,
    one_label_mix: float = 0.5,
) -> tuple[PseudoLabels, dict[str, Any]]:
    """Pseudo-labels of ``pool`` from ``(1 - w) log p_few + w log p_zero``, renormalised.

    ``p_zero`` is the zero-shot classifier (cosine to ``class_text``) and ``p_few`` the
    prototype classifier of the labeled rows, each with its temperature fitted on the labeled
    rows (the few-shot one on leave-one-out scores). ``w = mix`` when ``mix >= 0``; otherwise the
    weight in ``0, 0.1, ..., 1`` with the best leave-one-out accuracy (ties: lower NLL, then the
    smaller weight), or ``one_label_mix`` when no labeled row can be held out (one label per
    class). Returns the pseudo-labels (confidence = the mixed probability) and a report.
    """
    xl, xp, y = fused_embedding(labeled), fused_embedding(pool), labeled.y
    num_classes = class_text.shape[0]
    text = F.normalize(class_text.float(), dim=1)
    t_zero = fit_temperature(xl @ text.T, y)
    loo, valid = leave_one_out_scores(xl, y, num_classes)
    t_few = fit_temperature(loo[valid], y[valid]) if valid.any() else t_zero
    zero_lab = F.log_softmax(xl @ text.T / t_zero, dim=1)
    few_lab = F.log_softmax(loo / t_few, dim=1)
    chosen, table = _choose_mix(zero_lab, few_lab, y, valid, mix, one_label_mix)
    protos = prototypes(xl, y, num_classes)
    mixed = (1 - chosen) * F.log_softmax(xp @ protos.T / t_few, dim=1) + chosen * F.log_softmax(
        xp @ text.T / t_zero, dim=1
    )
    probs = mixed.softmax(dim=1)
    reached = torch.ones(len(pool), dtype=torch.bool)
    labels = from_probs(probs, reached, probs.max(dim=1).values, "zero_shot_mix")
    info = {
        "mix": chosen,
        "temperature_zero_shot": t_zero,
        "temperature_few_shot": t_few,
        "held_out_rows": int(valid.sum()),
        "loo_accuracy_by_mix": table,
    }
    return labels, info


def _choose_mix(
    zero: Tensor, few: Tensor, y: Tensor, valid: Tensor, mix: float, one_label_mix: float
) -> tuple[float, dict[str, float]]:
    if mix >= 0:
        return float(mix), {}
    if not valid.any():
        return float(one_label_mix), {}
    best, best_key, table = 0.0, (-1.0, math.inf), {}
    for w in _MIXES.tolist():
        logp = ((1 - w) * few + w * zero)[valid]
        acc = float((logp.argmax(1) == y[valid]).float().mean())
        nll = float(F.cross_entropy(logp, y[valid]))
        table[f"{w:.1f}"] = acc
        if acc > best_key[0] or (acc == best_key[0] and nll < best_key[1]):
            best, best_key = w, (acc, nll)
    return best, table


__all__ = [
    "fit_temperature",
    "leave_one_out_scores",
    "mix_zero_and_few_shot",
    "prototypes",
]
