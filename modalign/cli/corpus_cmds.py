"""``modalign embed`` and ``modalign index build|add``: :func:`modalign.embed`,
:func:`modalign.build_index`, :func:`modalign.add_to_index` behind flags."""

from __future__ import annotations

import argparse
from typing import Any

from modalign.cli.common import add_common, add_data, emit


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    import modalign

    result = modalign.embed(
        args.model,
        args.data,
        args.out,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        device=args.device,
    )
    emit(args, result)
    return result


def cmd_index_build(args: argparse.Namespace) -> dict[str, Any]:
    import modalign
    from modalign.retrieval import IndexBuildOptions

    options = IndexBuildOptions(
        factory=args.factory,
        device=args.device,
        memory_budget_bytes=args.memory_budget,
        target_recall=args.target_recall,
    )
    result = modalign.build_index(
        args.out,
        model=args.model,
        data=args.data,
        embeddings=args.embeddings,
        options=options,
        batch_size=args.batch_size,
        shards=args.shards,
    )
    emit(args, result)
    return result


def cmd_index_add(args: argparse.Namespace) -> dict[str, Any]:
    import modalign

    result = modalign.add_to_index(
        args.index,
        model=args.model,
        data=args.data,
        embeddings=args.embeddings,
        batch_size=args.batch_size,
        device=args.device,
    )
    emit(args, result)
    return result


def add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed a corpus into resumable embedding shards")
    p.add_argument("--model", required=True)
    add_data(p)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-rows", type=int, default=10_000)
    add_common(p, device=True)
    p.set_defaults(func=cmd_embed)


def add_index_group(sub: Any) -> None:
    index = sub.add_parser("index", help="FAISS indexes").add_subparsers(
        dest="index_command", required=True, metavar="ACTION"
    )
    p = index.add_parser(
        "build", help="index a corpus (--model/--data) or embedding shards (--embeddings)"
    )
    p.add_argument("--model")
    add_data(p, required=False)
    p.add_argument("--embeddings")
    p.add_argument("--out", required=True)
    p.add_argument("--factory", default="auto", help="auto or a FAISS index_factory string")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes the index may use (auto)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="with --embeddings: train the IVF quantizer once, add the vectors in N parallel "
        "processes and merge them into one on-disk index (index.ivfdata)",
    )
    add_common(p, device=True)
    p.set_defaults(func=cmd_index_build)

    p = index.add_parser("add", help="append items to an existing index without rebuilding it")
    p.add_argument("--index", required=True)
    p.add_argument("--model")
    add_data(p, required=False)
    p.add_argument("--embeddings")
    add_common(p, device=True)
    p.set_defaults(func=cmd_index_add)
