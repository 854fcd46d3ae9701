"""Evaluation metrics: classification scores, confusion plots, robustness curves, L-inf attacks.

The attacks take any differentiable ``forward(x) -> logits`` callable, so they work on raw inputs
and on embeddings alike. They never touch model parameters' ``.grad`` and do not change train/eval
mode: put the model in eval mode first if dropout should be off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError

# ------------------------------------------------------------------------------ classification


def _as_labels(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise UserInputError(f"{name} must be a 1-D sequence of integer class ids")
    return arr.astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts; row = true class, column = predicted class."""
    true, pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise UserInputError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise UserInputError(f"{name} holds class ids outside [0, {num_classes})")
    flat = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix (nested list, rows = true).

    Macro-F1 averages over classes that occur in ``y_true`` or ``y_pred`` (as scikit-learn does);
    a class absent from both has no defined F1 and gets ``None`` in ``per_class_f1``.
    """
    if num_classes < 1:
        raise UserInputError(f"num_classes must be >= 1, got {num_classes}")
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    total = int(matrix.sum())
    if total == 0:
        raise UserInputError("classification_metrics needs at least one prediction")
    tp = np.diag(matrix).astype(np.float64)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted count + true count).
    denom = matrix.sum(axis=0) + matrix.sum(axis=1)
    seen = denom > 0
    f1 = np.where(seen, 2 * tp / np.maximum(denom, 1), np.nan)
    return {
        "accuracy": float(tp.sum() / total),
        "macro_f1": float(f1[seen].mean()),
        "per_class_f1": [float(v) if s else None for v, s in zip(f1, seen)],
        "confusion": matrix.tolist(),
        "num_samples": total,
    }


def save_confusion_png(
    matrix: Sequence[Sequence[int]] | np.ndarray | Tensor,
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """Draw the confusion matrix (rows = true, columns = predicted) with counts to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.asarray(matrix.cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64)
    n = len(class_names)
    if data.shape != (n, n):
        raise UserInputError(f"confusion matrix shape {data.shape} does not match {n} class names")
    size = max(4.0, 0.5 * n + 2)
    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 30:  # beyond that the numbers are unreadable
        _annotate(ax, data)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _annotate(ax: Any, data: np.ndarray) -> None:
    midpoint = data.max() / 2 if data.size else 0
    for (i, j), value in np.ndenumerate(data):
        colour = "white" if value > midpoint else "black"
        ax.text(j, i, f"{value:g}", ha="center", va="center", color=colour, fontsize=8)


def robustness_auc(levels: Sequence[float], accuracies: Sequence[float]) -> float:
    """Normalised area under the accuracy-vs-noise-level curve (trapezoid rule).

    The area is divided by the level range, so a flat curve scores its accuracy and the result is
    comparable across level grids. A single point returns its accuracy.
    """
    x, y = np.asarray(levels, dtype=np.float64), np.asarray(accuracies, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise UserInputError("robustness_auc needs equally long, non-empty levels and accuracies")
    if x.size == 1:
        return float(y[0])
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span <= 0:
        raise UserInputError("robustness_auc needs at least two distinct noise levels")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / span


# ------------------------------------------------------------------------------ attacks


def _loss_grad(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy at ``x`` and its gradient w.r.t. ``x`` only."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        losses = F.cross_entropy(forward(x), y, reduction="none")
        # Sum, not mean: each row's gradient is then independent of the batch size.
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def _check_attack(x: Tensor, y: Tensor, eps: float) -> None:
    if eps < 0:
        raise UserInputError(f"attack budget eps must be >= 0, got {eps}")
    if x.shape[0] != y.shape[0]:
        raise UserInputError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")


def _identity(x: Tensor) -> Tensor:
    return x


def fgsm(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    clamp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size ``eps``.

    Returns a detached ``x_adv`` with ``|x_adv - x|_inf <= eps`` that raises the cross-entropy,
    projected by ``clamp`` onto the valid input range (e.g. ``ModalitySpec.clamp``) when given.
    """
    _check_attack(x, y, eps)
    _, grad = _loss_grad(forward, x, y)
    return (clamp or _identity)(x.detach() + eps * grad.sign()).detach()


def pgd(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    clamp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) within the L-inf ball of radius ``eps``.

    ``steps`` signed-gradient steps of size ``alpha``, each projected back onto the ball, from a
    uniform random start when ``random_start``. Every iterate (the start included) is also
    projected by ``clamp`` onto the valid input range when given; the intersection of the ball
    and a box is a box, so clamping after the ball projection is the exact projection. Per row,
    the iterate with the highest loss seen is returned, so the attack never ends weaker than one
    of its own steps.
    """
    _check_attack(x, y, eps)
    if alpha <= 0 or steps < 1:
        raise UserInputError(
            f"pgd needs alpha > 0 and steps >= 1 (got alpha={alpha}, steps={steps})"
        )
    x = x.detach()
    adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=_rand_device(x, generator))
        adv = x + (2 * noise.to(device=x.device, dtype=x.dtype) - 1) * eps
    project = clamp or _identity
    adv = project(adv)
    best, best_loss = adv.clone(), torch.full((x.shape[0],), -torch.inf, device=x.device)
    for _ in range(steps):
        loss, grad = _loss_grad(forward, adv, y)
        best, best_loss = _keep_best(best, best_loss, adv, loss)
        adv = project(x + (adv + alpha * grad.sign() - x).clamp(-eps, eps))
    with torch.no_grad():
        final_loss = F.cross_entropy(forward(adv), y, reduction="none")
    best, _ = _keep_best(best, best_loss, adv, final_loss)
    return best.detach()


def _rand_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def _keep_best(
    best: Tensor, best_loss: Tensor, cand: Tensor, loss: Tensor
) -> tuple[Tensor, Tensor]:
    better = loss > best_loss
    rows = better.view(-1, *([1] * (cand.dim() - 1)))
    return torch.where(rows, cand, best), torch.where(better, loss, best_loss)


__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "fgsm",
    "pgd",
    "robustness_auc",
    "save_confusion_png",
]
