"""``modalign index build --embeddings DIR``: a corpus index straight from embedding shards.

Nothing holds the corpus in RAM: per modality the vectors are read shard by shard
(:func:`~modalign.retrieval.index.chunked.build_chunked`), and ``items.jsonl`` is written while
the shard metadata is read a second time, so peak memory is the index itself plus one shard
and the id list. The output is the same directory as
:func:`~modalign.retrieval.index.corpus.build_corpus_index` writes (same lock, same atomic swap).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_dir, output_dir, read_json_meta, verify_files
from modalign.core.errors import UserInputError
from modalign.retrieval.embed_shards import FORMAT as EMB_FORMAT
from modalign.retrieval.embed_shards import META as EMB_META
from modalign.retrieval.index import IndexBuildOptions
from modalign.retrieval.index.chunked import ShardVectors, build_chunked
from modalign.retrieval.index.corpus import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_KIND,
    ITEMS_FILE,
    META_FILE,
    MediaRoots,
    check_folder_name,
    seal_files,
)
from modalign.retrieval.index.sharded import build_sharded

__all__ = ["build_corpus_index_from_shards"]


def _parts(root: Path, modality: str) -> list[Path]:
    folder = root / modality
    return sorted(folder.glob("part-*.json")) if folder.is_dir() else []


def _infos(parts: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for part in parts:
        try:
            info = json.loads(part.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{part}: unreadable shard ({exc}); delete it and rerun") from None
        yield part, info


def _ids(parts: list[Path], modality: str) -> list[str]:
    """Every shard's ids (checked against its vectors' checksum and row count), in order."""
    ids: list[str] = []
    for part, info in _infos(parts):
        verify_files(part.parent, info, "embedding shard")
        if len(info["ids"]) != info["rows"]:
            raise UserInputError(f"{part}: {len(info['ids'])} ids for {info['rows']} rows")
        ids += [f"{modality}:{i}" for i in info["ids"]]
    return ids


def _write_items(parts: list[Path], modality: str, fh: Any, roots: MediaRoots) -> None:
    for _, info in _infos(parts):
        labels = info.get("labels") or [None] * len(info["ids"])
        values = info.get("values") or [""] * len(info["ids"])
        for i, v, lab in zip(info["ids"], values, labels):
            rec = {"id": str(i), "modality": modality, "value": v, "label": lab}
            fh.write(json.dumps(rec) + "\n")
            roots.add(modality, v)


def build_corpus_index_from_shards(
    embeddings_dir: str | Path,
    out_dir: str | Path,
    options: IndexBuildOptions | None = None,
    shards: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Index every modality of a ``modalign embed`` directory; returns (build stats per
    modality, fingerprint). ``options``: how each index is built (default
    ``IndexBuildOptions()``). ``shards``: build each modality's IVF index with that many
    processes, merged into one on-disk index (:func:`~.sharded.build_sharded`)."""
    root, out = Path(embeddings_dir), Path(out_dir)
    emb = read_json_meta(
        root / EMB_META, "embeddings dir", "create it with `modalign embed`", format=EMB_FORMAT
    )
    plan = {m: _parts(root, m) for m in emb.get("modalities", [])}
    plan = {m: p for m, p in sorted(plan.items()) if p}
    if not plan:
        raise UserInputError(f"{root}: no finished embedding shard; run `modalign embed` first")
    build: dict[str, Any] = {}
    roots = MediaRoots()
    with output_dir(out, INDEX_KIND, "--out"), atomic_dir(out) as tmp:
        for m, parts in plan.items():
            check_folder_name(m, out / META_FILE, "modalities")
            vectors = ShardVectors.open([p.with_suffix(".npy") for p in parts])
            ids, fp = _ids(parts, m), emb["fingerprint"]
            if shards is None:
                ix = build_chunked(vectors, ids, options, fingerprint=fp)
                ix.save(tmp / m)
            else:  # writes tmp / m itself: the merged lists are a file beside the index
                ix = build_sharded(vectors, ids, tmp / m, shards, options, fingerprint=fp)
            build[m] = {"items": len(ix), "factory": ix.factory, **ix.stats.__dict__}
            del ix
        with (tmp / ITEMS_FILE).open("w", encoding="utf-8") as fh:
            for m, parts in plan.items():
                _write_items(parts, m, fh, roots)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": emb["fingerprint"],
            "model": emb.get("model", ""), "modalities": sorted(plan), "dim": int(emb["dim"]),
            "build": build, "media_roots": roots.to_dict(), "files": seal_files(tmp, plan),
        }  # fmt: skip
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return build, emb["fingerprint"]
