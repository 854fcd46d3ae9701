"""PNG plots of benchmark results (matplotlib Agg, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "curves_png",
    "few_label_png",
    "new_figure",
    "reliability_png",
    "retrieval_grid_png",
    "save_png",
]


def new_figure(w: float = 6.0, h: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, png: Path) -> Path:
    from modalign.core.artifact import atomic_path

    fig.tight_layout()
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return png


def _errorbars(ax: Any, xs: list[float], figs: list[dict[str, Any]], label: str) -> None:
    ys = [f["value"] for f in figs]
    lo = [f["value"] - f["ci_low"] for f in figs]
    hi = [f["ci_high"] - f["value"] for f in figs]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)


def curves_png(curves: dict[str, Any], key: str, xlabel: str, png: Path) -> Path:
    """Accuracy (95% CI bars) vs noise level / eps, one line per modality (or attack:modality)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, c in curves.items():
        _errorbars(ax, c[key], c["accuracy"], name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, png)


def few_label_png(rows: list[dict[str, Any]], png: Path, scratch: list[dict] | None = None) -> Path:
    """Accuracy vs labels per class, one line per (head, pseudo-labeler)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault(f"{r['head']} + {r['pseudo_label']}", []).append(r)
    for name, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["shots"])
        _errorbars(ax, [r["shots"] for r in rs], [r["accuracy"] for r in rs], name)
    if scratch:
        rs = sorted(scratch, key=lambda r: r["shots"])
        _errorbars(ax, [r["shots"] for r in rs], [r["accuracy"] for r in rs], "from scratch")
    ax.set_xscale("log")
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, png)


def reliability_png(bins: list[dict[str, Any]], png: Path) -> Path:
    """Reliability diagram: accuracy vs confidence per bin (bar width = bin), diagonal = ideal."""
    fig = new_figure(4.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        align="edge",
        alpha=0.7,
        edgecolor="k",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return save_png(fig, png)


def retrieval_grid_png(examples: list[dict[str, Any]], png: Path) -> Path | None:
    """One row per query: the query's label, then its top hits (images) titled by label."""
    from PIL import Image

    rows = [e for e in examples if e["hits"]]
    if not rows:
        return None
    k = max(len(e["hits"]) for e in rows)
    fig = new_figure(1.6 * (k + 1), 1.7 * len(rows))
    for i, e in enumerate(rows):
        ax = fig.add_subplot(len(rows), k + 1, i * (k + 1) + 1)
        ax.text(0.5, 0.5, f"{e['modality']} query\n{e['label']}", ha="center", va="center")
        ax.axis("off")
        for j, h in enumerate(e["hits"]):
            ax = fig.add_subplot(len(rows), k + 1, i * (k + 1) + j + 2)
            try:
                ax.imshow(Image.open(h["value"]).convert("L"), cmap="gray")
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "?", ha="center")
            ok = h["label"] == e["label"]
            ax.set_title(str(h["label"]), color="green" if ok else "red", fontsize=9)
            ax.axis("off")
    return save_png(fig, png)
