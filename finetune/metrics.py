"""Classification metrics: scores per class and the confusion matrix (as numbers and a PNG).

Robustness curves and the L-inf attacks live in :mod:`modalign.finetune.robustness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "save_confusion_png",
]
