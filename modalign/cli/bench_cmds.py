"""``modalign benchmark SUITE --model BUNDLE ...`` and ``modalign benchmark leaderboard DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modalign.cli.common import add_common, add_set, emit, set_pairs
from modalign.core.errors import UserInputError


def cmd_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.suite == "leaderboard":
        return cmd_leaderboard(args)
    if args.folder:
        raise UserInputError(
            f"unexpected argument {args.folder!r}: usage is modalign benchmark SUITE --model "
            "BUNDLE (or modalign benchmark leaderboard DIR)"
        )
    import modalign
    from modalign.benchmark.render import report_markdown

    report = modalign.run_benchmark(
        args.suite, args.model, args.out, overrides=set_pairs(args), device=args.device
    )
    emit(args, report, report_markdown(report) + f"\nwrote {Path(report['out']) / 'report.json'}")
    return report


def cmd_leaderboard(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.benchmark.render import write_leaderboard

    if not args.folder:
        raise UserInputError("usage: modalign benchmark leaderboard DIR (a folder of reports)")
    root = Path(args.folder)
    if not root.is_dir():
        raise UserInputError(f"{root}: not a folder; give the folder holding report.json files")
    path, rows = write_leaderboard(root, args.out and Path(args.out))
    result = {"leaderboard": str(path), "rows": rows}
    emit(args, result, path.read_text())
    return result


def add_benchmark(sub: Any) -> None:
    p = sub.add_parser(
        "benchmark",
        help="run a benchmark suite on model bundles (report.json/md, plots); "
        "`benchmark leaderboard DIR` merges reports",
    )
    p.add_argument(
        "suite",
        metavar="SUITE",
        help="suite YAML or built-in name (demo, avmnist, cifar10), or 'leaderboard'",
    )
    p.add_argument("folder", nargs="?", metavar="DIR", help="(leaderboard) folder of reports")
    p.add_argument("--model", action="append", metavar="BUNDLE", help="model bundle (repeatable)")
    p.add_argument("--out", help="report folder (default runs/benchmark/SUITE); leaderboard: file")
    add_set(p)
    add_common(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=cmd_benchmark)
