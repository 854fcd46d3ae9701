"""Plain-text/markdown tables and plots for reports (no extra dependencies)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table that also reads well in a terminal."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
        for i, h in enumerate(headers)
    ]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def retrieval_table(result: dict[str, Any]) -> str:
    rows = [
        [
            pair,
            m.get("recall@1"),
            m.get("recall@5"),
            m.get("recall@10"),
            m.get("map"),
            m.get("median_rank"),
            m.get("queries"),
        ]
        for pair, m in sorted(result["pairs"].items())
    ]
    return table(["pair", "R@1", "R@5", "R@10", "mAP", "median rank", "queries"], rows)


def classify_table(results: dict[str, dict[str, Any]]) -> str:
    subsets = sorted(
        {s for r in results.values() for s in r.get("by_subset", {})},
        key=lambda s: (-s.count("+"), s),
    )
    rows = [
        [
            name,
            r.get("accuracy"),
            r.get("macro_f1"),
            *(r.get("by_subset", {}).get(s) for s in subsets),
        ]
        for name, r in results.items()
    ]
    return table(["classifier", "accuracy", "macro-F1", *(f"acc {s}" for s in subsets)], rows)


def plot_loss(metrics_file: Path, out_png: Path) -> Path | None:
    """Training loss vs step from ``metrics.jsonl``."""
    steps, losses = [], []
    if not metrics_file.is_file():
        return None
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "loss" in rec and "event" not in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png
