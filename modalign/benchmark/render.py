"""report.md for one report and leaderboard.md merging every report under a folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from modalign.benchmark.tasks import TASKS
from modalign.core.artifact import atomic_write_text, read_json_meta
from modalign.report import table

__all__ = ["find_reports", "leaderboard", "report_markdown", "write_leaderboard"]


def report_markdown(report: dict[str, Any]) -> str:
    """Every model x corpus x task as a section; figures as ``value [95% CI]``."""
    lines = [
        f"# Benchmark `{report['suite']}`",
        "",
        f"95% bootstrap intervals ({report['resamples']} resamples, seed {report['seed']}); "
        "n = items behind each figure.",
        "",
    ]
    lines += ["## Summary", "", _summary(report), ""]
    for name, m in report["models"].items():
        for cname, cell in m["corpora"].items():
            lines += [f"## {name} on {cname}", ""]
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
    return [
        {
            "suite": report["suite"],
            "model": name,
            "corpus": cname,
            "score": cell["score"],
            "report": where,
            **cell["headline"],
        }
        for name, m in report["models"].items()
        for cname, cell in m["corpora"].items()
    ]


def _table(rows: list[dict[str, Any]], with_report: bool = False) -> str:
    fixed = ["suite", "corpus", "model", "score"] + (["report"] if with_report else [])
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in {*fixed, "report"}))
    rows = sorted(rows, key=lambda r: (r["suite"], r["corpus"], -_num(r["score"])))
    return table(
        ["rank", *fixed, *cols],
        [
            [i + 1, *(r.get(k) for k in fixed), *(r.get(k) for k in cols)]
            for i, r in enumerate(rows)
        ],
    )


def _num(v: Any) -> float:
    return v if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf


def find_reports(root: str | Path) -> list[Path]:
    """Every ``report.json`` of the benchmark format under ``root`` (sorted)."""
    from modalign.benchmark.run import REPORT_FORMAT

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
    from modalign.benchmark.run import REPORT_FORMAT, REPORT_VERSION

    rows: list[dict[str, Any]] = []
    for p in find_reports(root):
        rep = read_json_meta(
            p, "benchmark report", "run modalign benchmark", REPORT_FORMAT, REPORT_VERSION
        )
        rows += _rows(rep, str(p.parent.relative_to(root)) if p.parent != Path(root) else ".")
    text = "# Leaderboard\n\n" + (_table(rows, True) if rows else "(no reports found)") + "\n"
    return rows, text


def write_leaderboard(root: str | Path, out: str | Path | None = None) -> tuple[Path, list]:
    """``leaderboard.md`` (default: in ``root``) from every report under ``root``."""
    rows, text = leaderboard(root)
    path = Path(out) if out else Path(root) / "leaderboard.md"
    atomic_write_text(path, text)
    return path, rows
