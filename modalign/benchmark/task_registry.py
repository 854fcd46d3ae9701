"""The benchmark task registry (entry-point group ``modalign.benchmark_tasks``).

A task is a :class:`Task`: ``run(ctx, options) -> result`` (JSON-ready; every figure a
``Figure.to_dict()``), ``markdown(result) -> str`` for report.md, ``headline(result) -> {column:
value}`` for the leaderboard and optionally ``plot(result, png) -> png | None``.

How to add a task::

    from dataclasses import dataclass
    from modalign.benchmark.figures import bootstrap_mean
    from modalign.benchmark.task_registry import TASKS, Task

    @dataclass(frozen=True)
    class NormOptions:
        modality: str = "image"

    def run(ctx, opts):
        e = ctx.retrieval_embeddings()[opts.modality]
        return {"mean_norm": bootstrap_mean((e.vectors ** 2).sum(1) ** 0.5, ctx.seed).to_dict()}

    TASKS.add("norm", Task(run, markdown=lambda r: f"mean norm {r['mean_norm']['value']:.3f}",
                            headline=lambda r: {}), NormOptions)

then ``tasks: [{kind: norm, options: {modality: audio}}]`` in a suite. A plugin package puts the
``add`` in a hook ``def register(registry): ...`` declared under ``modalign.benchmark_tasks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.registry import Registry

__all__ = ["TASKS", "Task", "fmt_figure"]


@dataclass(frozen=True)
class Task:
    run: Callable[[Any, Any], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    headline: Callable[[dict[str, Any]], dict[str, float]]
    plot: Callable[[dict[str, Any], Path], Path | None] | None = None
    higher_is_better: bool = True  # of the headline values (the leaderboard score averages them)


TASKS: Registry[Task] = Registry("benchmark task", group="modalign.benchmark_tasks")


def fmt_figure(f: dict[str, Any] | None) -> str:
    """``0.812 [0.780, 0.845]`` (n in the column header or the table's caption)."""
    if not f:
        return ""
    return f"{f['value']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]"
