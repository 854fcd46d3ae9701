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
from typing import NoReturn

from modalign.cli.bench_cmds import add_benchmark
from modalign.cli.common import emit_error
from modalign.cli.corpus_cmds import add_embed, add_index_group
from modalign.cli.data_cmds import add_data_group, add_demo
from modalign.cli.eval_cmds import add_evaluate_group, add_predict
from modalign.cli.export_cmds import add_export
from modalign.cli.search_cmd import add_search
from modalign.cli.train_cmds import add_train_group
from modalign.cli.tune_cmds import add_tune
from modalign.core.errors import ModalignError, UserInputError
from modalign.core.invocation import invoked_as
from modalign.server.command import add_serve_command

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (its sub-command parsers too) that remembers its last usage error, so
    ``--json`` can report it as the one JSON object on stdout."""

    last_error: str | None = None

    def error(self, message: str) -> NoReturn:
        _Parser.last_error = f"{self.prog}: {message}"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``modalign`` parser, assembled from the command-group modules."""
    parser = _Parser(
        prog="modalign", description="Multimodal self-/semi-supervised representation learning."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_data_group, add_train_group, add_embed, add_index_group,
                add_search, add_evaluate_group, add_predict, add_serve_command, add_benchmark,
                add_tune, add_export):  # fmt: skip
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
    words = list(sys.argv[1:] if argv is None else argv)
    _Parser.last_error = None
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # usage error (2) or --help (0): argparse already wrote stderr
        if exc.code not in (0, None) and "--json" in words:
            emit_error(_Parser.last_error or "invalid arguments", 2)
        raise
    _setup_logging(args.quiet)
    as_json = bool(getattr(args, "json", False))
    try:
        with invoked_as(["modalign", *words]):  # what artifacts record as the exact command
            args.func(args)
    except UserInputError as exc:
        return _fail(f"{exc}", 2, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except (ModalignError, Exception) as exc:
        if args.debug:
            raise
        message = f"{type(exc).__name__}: {exc}"
        return _fail(message, 1, as_json, " (run with --debug for the traceback)")
    return 0


def _fail(message: str, code: int, as_json: bool, hint: str = "") -> int:
    """Report an error: on stderr always, and with ``--json`` as the one object on stdout."""
    print(f"modalign: {'error: ' if code != 130 else ''}{message}{hint}", file=sys.stderr)
    if as_json:
        emit_error(message, code)
    return code
