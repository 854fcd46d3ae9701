"""``modalign`` command line: parse, load config, call library functions, report.

Contract (``docs/design.md``): ``--json`` prints exactly one JSON object on stdout (logs and
progress go to stderr); exit 0 on success, 2 on a usage/config/input error, 1 otherwise.
One module per command group; each command is a small ``cmd_*(args) -> dict`` function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from modalign.cli.bench_cmds import add_benchmark
from modalign.cli.corpus_cmds import add_embed, add_index_group
from modalign.cli.data_cmds import add_data_group, add_demo
from modalign.cli.eval_cmds import add_evaluate_group, add_predict
from modalign.cli.search_cmd import add_search
from modalign.cli.train_cmds import add_train_group
from modalign.cli.tune_cmds import add_tune
from modalign.core.errors import ModalignError, UserInputError
from modalign.server.command import add_serve_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole ``modalign`` parser, assembled from the command-group modules."""
    parser = argparse.ArgumentParser(
        prog="modalign", description="Multimodal self-/semi-supervised representation learning."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_data_group, add_train_group, add_embed, add_index_group,
                add_search, add_evaluate_group, add_predict, add_serve_command, add_benchmark,
                add_tune):  # fmt: skip
        add(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the CLI process never reaches for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("modalign")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 user error, 1 other, 130 interrupt)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        args.func(args)
    except UserInputError as exc:
        print(f"modalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modalign: interrupted", file=sys.stderr)
        return 130
    except (ModalignError, Exception) as exc:
        if args.debug:
            raise
        print(
            f"modalign: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
