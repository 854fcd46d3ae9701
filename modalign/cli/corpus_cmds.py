"""``modalign embed``, ``modalign index build|add`` and ``modalign search``."""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from modalign.cli.common import add_common, add_data, emit, launch_world
from modalign.core.errors import UserInputError

log = logging.getLogger("modalign")


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.core.artifact import output_dir
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed_shards import (
        EMBEDDINGS_KIND,
        rank_device,
        write_embedding_shards,
    )

    rank, size = launch_world()
    device = rank_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    # rank 0 claims --out before the model is loaded (the writer below re-enters the claim)
    claim = output_dir(args.out, EMBEDDINGS_KIND, "--out") if rank == 0 else nullcontext()
    with claim:
        model = load_bundle(args.model, device=device)
        result = write_embedding_shards(
            model,
            args.data,
            args.out,
            shard_rows=args.shard_rows,
            batch_size=args.batch_size,
            rank=rank,
            world_size=size,
        )
    emit(args, result)
    return result


def _embeddings(args: argparse.Namespace) -> tuple[dict[str, Any], str, str]:
    from modalign.data.manifest import is_manifest
    from modalign.data.modality import MODALITIES
    from modalign.data.preflight import check_source
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.embed_shards import read_embedding_shards

    if args.embeddings:
        emb, meta = read_embedding_shards(args.embeddings)
        return emb, meta["fingerprint"], meta.get("model", "")
    if not (args.model and args.data):
        raise UserInputError("give --model DIR and --data SRC, or --embeddings DIR")
    if is_manifest(args.data):  # an index needs unique ids: named with their lines, up front
        check_source(args.data, MODALITIES.names(), "--data", unique_ids=True)
    model = load_bundle(args.model, device=args.device)
    emb, bad = embed_source(model, args.data, batch_size=args.batch_size)
    if bad.total:
        log.warning(bad.summary())
    return emb, model.fingerprint, str(Path(args.model).resolve())


def cmd_index_build(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.core.artifact import output_dir
    from modalign.retrieval.index.corpus import INDEX_KIND

    # --out is claimed (checked, locked) before anything is embedded, until the index is in place
    with output_dir(args.out, INDEX_KIND, "--out"):
        return _index_build(args)


def _index_build(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.retrieval.index.corpus import build_corpus_index
    from modalign.retrieval.index.from_shards import build_corpus_index_from_shards

    if args.embeddings:  # from disk, shard by shard: memory bounded by the index
        stats, fingerprint = build_corpus_index_from_shards(
            args.embeddings, args.out, factory=args.factory, device=args.device,
            memory_budget_bytes=args.memory_budget, target_recall=args.target_recall,
        )  # fmt: skip
        result = {"out": args.out, "fingerprint": fingerprint, "modalities": stats}
        emit(args, result)
        return result
    emb, fingerprint, model_path = _embeddings(args)
    stats = build_corpus_index(
        emb,
        args.out,
        fingerprint,
        model_path,
        factory=args.factory,
        device=args.device,
        memory_budget_bytes=args.memory_budget,
        target_recall=args.target_recall,
    )
    result = {"out": args.out, "fingerprint": fingerprint, "modalities": stats}
    emit(args, result)
    return result


def cmd_index_add(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.core.artifact import output_dir
    from modalign.retrieval.index.corpus import INDEX_KIND, CorpusIndex

    # held from before the index is read until the grown one is in place: no lost update
    with output_dir(args.index, INDEX_KIND, "--index"):
        index = CorpusIndex.open(args.index)  # a broken index: refused before any embedding
        emb, fingerprint, _ = _embeddings(args)
        added = index.add(emb, fingerprint)
        index.save(args.index, key="--index")
    total = {m: len(ix) for m, ix in index.indexes.items()}
    result = {"index": args.index, "added": added, "total": total}
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
    add_common(p, device=True)
    p.set_defaults(func=cmd_index_build)

    p = index.add_parser("add", help="append items to an existing index without rebuilding it")
    p.add_argument("--index", required=True)
    p.add_argument("--model")
    add_data(p, required=False)
    p.add_argument("--embeddings")
    add_common(p, device=True)
    p.set_defaults(func=cmd_index_add)
