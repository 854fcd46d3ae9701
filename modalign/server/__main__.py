"""``python -m modalign.server --index DIR [...]``: the same as ``modalign serve``."""

from __future__ import annotations

import argparse
import logging
import sys

from modalign.core.errors import UserInputError
from modalign.server.command import add_serve_command


def main(argv: list[str] | None = None) -> int:
    """Parse ``serve`` arguments and run the server; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m modalign.server")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"modalign serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
