"""``modalign search --query MODALITY=VALUE`` (``--text/--image/--audio`` are sugar for it):
:func:`modalign.search` behind flags."""

from __future__ import annotations

import argparse
from typing import Any

from modalign.cli.common import add_common, emit
from modalign.core.errors import UserInputError

SUGAR = ("text", "image", "audio")


def parse_queries(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--query m=v`` (repeatable) plus the ``--text/--image/--audio`` shorthands, in order."""
    queries = []
    for q in args.query or []:
        modality, sep, value = q.partition("=")
        if not sep or not modality.strip():
            raise UserInputError(
                f"--query {q!r}: expected MODALITY=VALUE, e.g. --query text='a red car' or "
                "--query depth=scan.npy"
            )
        queries.append((modality.strip(), value))
    queries += [(m, getattr(args, m)) for m in SUGAR if getattr(args, m) is not None]
    if not queries:
        raise UserInputError("give a query: --query MODALITY=VALUE (or --text/--image/--audio)")
    return queries


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    import modalign
    from modalign.report import table

    queries = parse_queries(args)
    found = modalign.search(
        args.index,
        queries,
        k=args.k,
        targets=args.target,
        model=args.model,
        device=args.device,
        mmap=args.mmap,
    )
    answers, texts = [], []
    for (modality, value), hits in zip(queries, found):
        answers.append({"query": {modality: value}, "results": [h.to_dict() for h in hits]})
        texts.append(table(
            ["rank", "score", "modality", "item", "label"],
            [[i + 1, h.score, h.modality, h.value, h.label] for i, h in enumerate(hits)],
        ))  # fmt: skip
    result = answers[0] if len(answers) == 1 else {"queries": answers}
    emit(args, result, "\n\n".join(texts))
    return result


def add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="query an index by any modality (--query MODALITY=VALUE)")
    p.add_argument("--index", required=True)
    p.add_argument(
        "--query",
        action="append",
        metavar="MODALITY=VALUE",
        help="text inline, other modalities a file path (repeatable: one result list each)",
    )
    for m in SUGAR:
        p.add_argument(f"--{m}", help=f"shorthand for --query {m}=VALUE")
    p.add_argument("-k", type=int, default=5)
    p.add_argument(
        "--mmap", action="store_true", help="map the index read-only instead of loading it in RAM"
    )
    p.add_argument(
        "--target", action="append", help="modality to search (repeatable; default: all others)"
    )
    p.add_argument("--model", help="model bundle (default: the one the index records)")
    add_common(p, device=True)
    p.set_defaults(func=cmd_search)
