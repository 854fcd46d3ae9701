"""report.md for one report and leaderboard.md merging every report under a folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from modalign.benchmark.tasks import TASKS
from modalign.core.artifact import atomic_write_text, read_json_meta
from modalign.report import table

REPORT_FORMAT = "modalign.benchmark_report"
REPORT_VERSION = 1

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "find_reports",
    "leaderboard",
    "report_markdown",
    "write_leaderboard",
]


def report_markdown(report: dict[str, Any]) -> str:
    """Every model x corpus x task as a section; figures as ``value [95% CI]``."""
    lines = [
        f"# Benchmark `{report['suite']}`",
        "",
        "95% intervals: Wilson for proportions (accuracy, recall@k), percentile bootstrap "
        f"for other means ({report['resamples']} resamples, seed {report['seed']}); "
        "n = items behind each figure.",
        "",
    ]
    lines += ["## Summary", "", _summary(report), ""]
    for name, m in report["models"].items():
        for cname, cell in m["corpora"].items():
            lines += [f"## {name} on {cname}", ""]
            if cell.get("not_scored"):
                lines += [cell["not_scored"], ""]
            for tname, entry in cell["tasks"].items():
                task = TASKS.get(entry["kind"]).factory
                lines += [f"### {tname}", "", task.markdown(entry["result"]), ""]
                if entry.get("plot"):
                    lines += [f"![{tname}]({entry['plot']})", ""]
    return "\n".join(lines)


def _summary(report: dict[str, Any]) -> str:
    rows = _rows(report, "")
    return _table(rows)


def _rows(report: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """One row per model x corpus; ``_scored`` (the figures it was scored on: task/path -> n)
    and ``_outcomes`` (proportions' per-item outcomes) stay out of the printed table."""
    rows = []
    for name, m in report["models"].items():
        for cname, cell in m["corpora"].items():
            figures = dict(_figures(cell.get("tasks", {}), ""))
            rows.append(
                {
                    "suite": report["suite"],
                    "model": name,
                    "corpus": cname,
                    "score": cell["score"],
                    "report": where,
                    **cell["headline"],
                    "_not_scored": cell.get("not_scored"),
                    "_scored": {path: f.get("n") for path, f in figures.items()},
                    "_outcomes": {
                        path: (f["outcomes"], f["n"])
                        for path, f in figures.items()
                        if f.get("outcomes") is not None
                    },
                }
            )
    return rows


def _figures(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every figure (``{"value", "ci_low", "ci_high", "n"...}``) under a report node, by path."""
    if isinstance(node, dict):
        if {"value", "ci_low", "ci_high", "n"} <= node.keys():
            return [(path, node)]
        return [f for k, v in node.items() for f in _figures(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _figures(v, f"{path}[{i}]")]
    return []


def _table(rows: list[dict[str, Any]], with_report: bool = False) -> str:
    """Ranked within suite x corpus, but only among rows scored on the same tasks (the same
    figures on the same number of items): a row scored on other or fewer tasks, or not at all,
    is listed unranked with the reason. ``vs next``: exact McNemar test against the next
    ranked row over the proportions both were scored on, item by item."""
    fixed = ["suite", "corpus", "model", "score"] + (["report"] if with_report else [])
    cols = list(
        dict.fromkeys(
            k for r in rows for k in r if k not in {*fixed, "report"} and not k.startswith("_")
        )
    )
    rows = sorted(rows, key=lambda r: (r["suite"], r["corpus"], -_num(r["score"])))
    ranks, notes, versus = _ranks(rows)
    return table(
        ["rank", *fixed, *cols, "vs next", "note"],
        [
            [ranks[i], *(r.get(k) for k in fixed), *(r.get(k) for k in cols), versus[i], notes[i]]
            for i, r in enumerate(rows)
        ],
    )


def _ranks(rows: list[dict[str, Any]]) -> tuple[list[Any], list[str], list[str]]:
    ranks: list[Any] = ["-"] * len(rows)
    notes, versus = [""] * len(rows), [""] * len(rows)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["suite"], r["corpus"]), []).append(i)
    for members in groups.values():
        scored = [
            i
            for i in members
            if not rows[i].get("_not_scored") and _num(rows[i]["score"]) > -math.inf
        ]
        signatures = [tuple(sorted(rows[i].get("_scored", {}).items())) for i in scored]
        # the reference task set: the one most rows were scored on (ties: the larger set)
        ref = max(set(signatures), key=lambda s: (signatures.count(s), len(s)), default=None)
        ranked = [i for i, sig in zip(scored, signatures) if sig == ref]
        for pos, i in enumerate(ranked):
            ranks[i] = pos + 1
            if pos + 1 < len(ranked):
                versus[i] = _paired(rows[i], rows[ranked[pos + 1]])
        for i in members:
            if rows[i].get("_not_scored"):
                notes[i] = str(rows[i]["_not_scored"])
            elif i not in ranked:
                notes[i] = "unranked: scored on other tasks than the ranked rows"
    return ranks, notes, versus


def _paired(a: dict[str, Any], b: dict[str, Any]) -> str:
    """McNemar over every proportion both rows hold on the same items (pooled discordance)."""
    from modalign.benchmark.figures import mcnemar, unpack_outcomes

    common = [
        p
        for p in a.get("_outcomes", {})
        if p in b.get("_outcomes", {}) and a["_outcomes"][p][1] == b["_outcomes"][p][1]
    ]
    if not common:
        return "no paired items"
    xs = [unpack_outcomes(*a["_outcomes"][p]) for p in common]
    ys = [unpack_outcomes(*b["_outcomes"][p]) for p in common]
    import numpy as np

    only_a, only_b, p_value = mcnemar(np.concatenate(xs), np.concatenate(ys))
    verdict = "differs" if p_value < 0.05 else "no significant difference"
    return f"p={p_value:.3g} ({verdict}; {only_a} vs {only_b} discordant)"


def _num(v: Any) -> float:
    return v if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf


def find_reports(root: str | Path) -> list[Path]:
    """Every ``report.json`` of the benchmark format under ``root`` (sorted)."""
    found = []
    for p in sorted(Path(root).rglob("report.json")):
        try:
            read_json_meta(p, "benchmark report", "", format=REPORT_FORMAT)
        except Exception:
            continue
        found.append(p)
    return found


def leaderboard(root: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Rows (one per report x model x corpus), ranked by score within suite and corpus."""
    rows: list[dict[str, Any]] = []
    for p in find_reports(root):
        rep = read_json_meta(
            p, "benchmark report", "run modalign benchmark", REPORT_FORMAT, REPORT_VERSION
        )
        rows += _rows(rep, str(p.parent.relative_to(root)) if p.parent != Path(root) else ".")
    text = "# Leaderboard\n\n" + (_table(rows, True) if rows else "(no reports found)") + "\n"
    rows = sorted(rows, key=lambda r: (r["suite"], r["corpus"], -_num(r["score"])))
    ranks, notes, versus = _ranks(rows)
    public = [
        {"rank": rank, **{k: v for k, v in r.items() if not k.startswith("_")}, "vs_next": vs,
         "note": note}
        for r, rank, vs, note in zip(rows, ranks, versus, notes)
    ]  # fmt: skip
    return public, text


def write_leaderboard(root: str | Path, out: str | Path | None = None) -> tuple[Path, list]:
    """``leaderboard.md`` (default: in ``root``) from every report under ``root``."""
    rows, text = leaderboard(root)
    path = Path(out) if out else Path(root) / "leaderboard.md"
    atomic_write_text(path, text)
    return path, rows
