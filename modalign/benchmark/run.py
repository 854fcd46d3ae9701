"""Run a suite on one or more model bundles -> ``report.json``, ``report.md`` and PNG plots.

``report.json`` (format ``modalign.benchmark_report``, version 1)::

    {"format": ..., "format_version": 1, "suite": "demo", "seed": 0, "resamples": 1000,
     "modalign_version": ..., "config": {...the suite...},
     "models": {"NAME": {"path": ..., "fingerprint": ...,
        "corpora": {"demo": {"score": 0.71,
            "headline": {"retrieval R@1 (mean)": 0.83, ...},
            "tasks": {"retrieval": {"kind": "retrieval", "result": {"pairs":
                {"audio->image": {"recall@1": {"value", "ci_low", "ci_high", "n"}, ...}}}},
                      ...}}}}},
     "plots": ["plots/NAME-demo-retrieval.png", ...]}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modalign.benchmark.context import TaskContext
from modalign.benchmark.render import REPORT_FORMAT, REPORT_VERSION, report_markdown
from modalign.benchmark.suite import Suite
from modalign.benchmark.tasks import TASKS
from modalign.core.artifact import OutputKind, output_dir, write_meta
from modalign.core.config_io import to_dict
from modalign.core.version import __version__

log = logging.getLogger(__name__)

REPORT_KIND = OutputKind(REPORT_FORMAT, "benchmark report", (("report.json", REPORT_FORMAT),))

__all__ = ["model_names", "run_benchmark"]


def model_names(paths: Sequence[str | Path]) -> list[str]:
    """Folder names, made unique with ``-2``, ``-3``... where two models share one."""
    names: list[str] = []
    for p in paths:
        base = Path(p).resolve().name or "model"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _run_cell(ctx: TaskContext, plots_dir: Path, plots: list[str]) -> dict[str, Any]:
    missing = [m for m in ctx.corpus.inputs if m not in ctx.model.modalities]
    if missing:  # scoring the model on other inputs than the suite states would mislead
        reason = (
            f"not scored: the model has no {', '.join(missing)} tower, and the suite scores "
            f"{ctx.corpus_name} on inputs {list(ctx.corpus.inputs)}"
        )
        log.warning("%s / %s: %s", ctx.model_name, ctx.corpus_name, reason)
        return {"score": None, "headline": {}, "tasks": {}, "not_scored": reason}
    tasks: dict[str, Any] = {}
    headline: dict[str, float] = {}
    scored: list[float] = []
    for spec in ctx.suite.tasks:
        task = TASKS.get(spec.kind).factory
        t = time.perf_counter()
        log.info("%s / %s: %s", ctx.model_name, ctx.corpus_name, spec.name)
        result = task.run(ctx, spec.typed_options())
        entry: dict[str, Any] = {
            "kind": spec.kind,
            "result": result,
            "seconds": round(time.perf_counter() - t, 2),
        }
        if task.plot is not None:
            png = plots_dir / f"{ctx.model_name}-{ctx.corpus_name}-{spec.name}.png"
            made = task.plot(result, png)
            if made is not None:
                entry["plot"] = f"plots/{png.name}"
                plots.append(entry["plot"])
        tasks[spec.name] = entry
        head = task.headline(result)
        headline.update({f"{spec.name}: {k}" if k in headline else k: v for k, v in head.items()})
        if task.higher_is_better:
            scored += [v for v in head.values() if v == v]
    score = sum(scored) / len(scored) if scored else float("nan")
    return {"score": score, "headline": headline, "tasks": tasks}


def run_benchmark(
    suite: Suite, models: Sequence[str | Path], out: str | Path, device: str = "cpu"
) -> dict[str, Any]:
    """Every task of ``suite`` on every corpus for every model; writes the report into ``out``.

    Inputs (corpora, models) are checked before any work; ``out`` is locked while writing.
    The process state (RNGs, threads...) is left as found.
    """
    from modalign.pretrain.bundle import load_bundle, read_bundle_meta
    from modalign.pretrain.process_state import process_state_guard

    started = time.perf_counter()
    with output_dir(out, REPORT_KIND, "--out") as out, process_state_guard():
        suite.check_inputs()
        for m in models:
            read_bundle_meta(m)  # not a bundle -> exit 2 before any work
        plots_dir = out / "plots"
        plots: list[str] = []
        report: dict[str, Any] = {
            "suite": suite.name,
            "seed": suite.seed,
            "resamples": suite.resamples,
            "modalign_version": __version__,
            "config": to_dict(suite),
            "models": {},
        }
        for name, path in zip(model_names(models), models):
            model = load_bundle(path, device=device)
            cells = {
                cname: _run_cell(
                    TaskContext(model, name, cname, corpus, suite, plots_dir), plots_dir, plots
                )
                for cname, corpus in suite.corpora.items()
            }
            report["models"][name] = {
                "path": str(Path(path).resolve()),
                "fingerprint": model.fingerprint,
                "corpora": cells,
            }
        report["plots"] = plots
        report["wall_s"] = round(time.perf_counter() - started, 2)
        from modalign.core.artifact import atomic_write_text

        write_meta(out / "report.json", REPORT_FORMAT, REPORT_VERSION, report)
        atomic_write_text(out / "report.md", report_markdown(report))
    from modalign.pretrain import update_card_metrics

    cards = {
        name: update_card_metrics(
            path, card_rows(report["models"][name]), f"benchmark {suite.name}", str(out)
        ).to_dict()
        for name, path in zip(model_names(models), models)
    }
    return {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, **report,
            "model_cards": cards}  # fmt: skip


def card_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A model's report figures (every ``{value, ci_low, ci_high, n}``) as model-card rows
    named by where they sit: ``CORPUS/TASK/...``."""
    from modalign.pretrain import metric_row

    rows: list[dict[str, Any]] = []

    def walk(node: Any, name: list[str]) -> None:
        if not isinstance(node, dict):
            return
        if {"value", "ci_low", "ci_high", "n"} <= node.keys():
            rows.append(metric_row("/".join(name), node["value"], node["ci_low"],
                                   node["ci_high"], node["n"], node.get("method", "")))  # fmt: skip
            return
        for key, child in node.items():
            walk(child, [*name, str(key)] if key not in ("result", "tasks", "pairs") else name)

    for corpus, cell in (entry.get("corpora") or {}).items():
        walk(cell.get("tasks") or {}, [corpus])
    return rows
