"""Resumable embedding shards (``modalign embed --out DIR``), written by the one embed loop.

Format, readable by any tool::

    DIR/embeddings.json              {"format": "modalign.embeddings", "key": {...}, "dim",
                                      "modalities", "shard_rows", "shards": N, "model"}
    DIR/<modality>/part-000000.npy   (n, dim) float32, L2-normalised
    DIR/<modality>/part-000000.json  {"rows", "ids", "labels", "values", "files": {sha256}}

Shard i covers source items [i*shard_rows, (i+1)*shard_rows) in file order. Each shard is an
``atomic_files`` artifact (its ``.json`` goes last and holds the ``.npy``'s sha256), so a rerun
skips finished shards. ``key`` holds everything that determines the output (model fingerprint,
the source's identity, modalities, shard size): an ``--out`` written for anything else is
refused. Ids are stored as JSON strings, so any character (line separators too) reads back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modalign.core.artifact import (
    LOCK_FILE,
    OutputKind,
    atomic_files,
    check_output_dir,
    lock_dir,
    output_dir,
    read_json_meta,
    remove_stale_temp,
    verify_files,
    write_meta,
)
from modalign.core.errors import UserInputError
from modalign.data.dataset import BadItemLog
from modalign.data.manifest import is_manifest
from modalign.data.shards import SHARD_SUFFIXES, expand_shards
from modalign.retrieval.embed import (
    Embeddings,
    EncoderModel,
    concat,
    embed_batches,
    open_embed_source,
    value_reader,
    wanted_specs,
)

FORMAT = "modalign.embeddings"
FORMAT_VERSION = 2
META = "embeddings.json"
EMBEDDINGS_KIND = OutputKind(
    FORMAT,
    "embeddings dir",
    ((META, FORMAT), (f".ranks/*/{LOCK_FILE}", FORMAT), ("part-*.done.json", f"{FORMAT}.shard")),
    scratch=(".ranks",),
)
"""Rank 0 claims the folder; every other rank checks it, then locks its slot in ``.ranks/``
(recording this kind, so rank 0 accepts what the other ranks wrote before its claim)."""


class NamedEncoderModel(EncoderModel, Protocol):
    """An :class:`EncoderModel` that names its weights (a loaded bundle); shards record both."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def path(self) -> str | Path: ...


def source_identity(src: str | Path) -> list[dict[str, Any]]:
    """Path, size and mtime of every file behind a SRC (manifest, each shard, a shard folder)."""
    if is_manifest(str(src)):
        files = [str(src)]
    elif Path(src).is_dir():  # a folder of shards (img2dataset's output folder)
        files = sorted(str(f) for f in Path(src).iterdir() if f.name.endswith(SHARD_SUFFIXES))
    else:
        files = expand_shards(str(src))
    out = []
    for f in files:
        p = Path(f)
        st = p.stat() if p.is_file() else None
        out.append({
            "path": str(p.resolve()) if st else f,
            "size": st.st_size if st else None,
            "mtime_ns": st.st_mtime_ns if st else None,
        })  # fmt: skip
    return out


def rank_device(device: str, local_rank: int) -> str:
    """This process's device under ``accelerate launch``: ``cuda`` -> ``cuda:LOCAL_RANK``.

    An explicit ``cuda:N`` or ``cpu`` is kept as given.
    """
    return f"cuda:{local_rank}" if device == "cuda" else device


def _check_key(out: Path, key: dict[str, Any]) -> None:
    meta_path = out / META
    if not meta_path.is_file():
        return
    old = read_json_meta(meta_path, "embeddings dir", "use a new --out dir", format=FORMAT)
    if old.get("key") != key:
        diff = [k for k in key if (old.get("key") or {}).get(k) != key[k]]
        raise UserInputError(
            f"{out}: holds embeddings of another model, corpus or settings (differs in: "
            f"{', '.join(diff) or 'format'}); use a new --out dir or delete it"
        )


def write_embedding_shards(
    model: NamedEncoderModel,
    src: str | Path,
    out_dir: str | Path,
    shard_rows: int = 10_000,
    batch_size: int = 64,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Stream a source into embedding shards; memory holds about one shard; finished shards
    are kept. Process ``rank`` of ``world_size`` writes a contiguous block of shards."""
    if shard_rows <= 0:
        raise UserInputError(f"--shard-rows {shard_rows}: must be positive")
    out = Path(out_dir)
    specs = wanted_specs(model)
    key = {
        "fingerprint": model.fingerprint,
        "source": source_identity(src),
        "modalities": list(specs),
        "shard_rows": shard_rows,
    }
    # Rank 0 locks the dir (no second run); other ranks lock their own slot inside it.
    if rank != 0:
        check_output_dir(out, EMBEDDINGS_KIND, "--out")
    claim = (
        output_dir(out, EMBEDDINGS_KIND, "--out")
        if rank == 0
        else lock_dir(out / ".ranks" / str(rank), "embeddings dir", FORMAT)
    )
    with claim:
        _check_key(out, key)
        if world_size == 1:  # temp files of a killed run; with several ranks, others' are live
            for d in [out, *(out / m for m in specs)]:
                remove_stale_temp(d)
        source = open_embed_source(src, specs, train=False)
        n_items = sum(source.counts(1))
        n_shards = (n_items + shard_rows - 1) // shard_rows
        if rank == 0:
            write_meta(out / META, FORMAT, FORMAT_VERSION, {
                "key": key, "dim": model.embed_dim, "modalities": list(specs),
                "shard_rows": shard_rows, "shards": n_shards, "source": str(src),
                "fingerprint": model.fingerprint, "model": str(Path(model.path).resolve()),
            })  # fmt: skip
        mine = _my_shards(n_shards, rank, world_size)
        todo = [s for s in mine if not _done(out, s)]
        bad = BadItemLog()
        if rank == 0:
            bad.add_counts(source.skipped, source.skipped_examples)
        if todo:
            _embed_range(model, source, src, out, todo, shard_rows, batch_size, specs, bad)
    return {"shards": n_shards, "written": len(todo), "already_done": len(mine) - len(todo),
            **bad.to_dict()}  # fmt: skip


def _my_shards(n: int, rank: int, world: int) -> list[int]:
    per = (n + world - 1) // world
    return list(range(rank * per, min(n, (rank + 1) * per)))


def _done(out: Path, shard: int) -> bool:
    """A shard is finished once its marker exists (written after every modality's files)."""
    return (out / f"part-{shard:06d}.done.json").is_file()


def _embed_range(
    model: EncoderModel,
    source: Any,
    src: str | Path,
    out: Path,
    todo: Sequence[int],
    shard_rows: int,
    batch_size: int,
    specs: Mapping[str, Any],
    bad: BadItemLog,
) -> None:
    """One ordered pass from the first unfinished shard; each finished shard is flushed."""
    source.skip = [todo[0] * shard_rows]  # records before it are passed over, not decoded
    wanted = set(todo)
    pending: dict[int, list[Embeddings]] = {s: [] for s in todo}
    batches = source.batches(batch_size, 0)
    for part in embed_batches(model, batches, list(specs), value_reader(source, src), bad):
        for e in part.values():
            for shard in sorted({p // shard_rows for p in e.positions} & wanted):
                pending[shard].append(_slice(e, shard, shard_rows))
        positions = [p for e in part.values() for p in e.positions]
        if not positions:
            continue
        low = min(positions)
        for shard in [s for s in pending if (s + 1) * shard_rows <= low]:
            _flush(out, shard, pending.pop(shard), model.embed_dim, list(specs))
        if not pending:
            break
    for shard, parts in pending.items():
        _flush(out, shard, parts, model.embed_dim, list(specs))


def _slice(e: Embeddings, shard: int, size: int) -> Embeddings:
    idx = [i for i, p in enumerate(e.positions) if p // size == shard]
    return Embeddings(e.modality, [e.ids[i] for i in idx], e.vectors[idx],
                      [e.labels[i] for i in idx], [e.values[i] for i in idx],
                      [e.positions[i] for i in idx])  # fmt: skip


def _flush(out: Path, shard: int, parts: list[Embeddings], dim: int, mods: list[str]) -> None:
    name = f"part-{shard:06d}"
    for m in mods:
        emb = concat([p for p in parts if p.modality == m], m, dim)
        if not len(emb):
            continue
        with atomic_files(out / m, f"{name}.json") as (tmp, meta):
            np.save(tmp / f"{name}.npy", emb.vectors.astype(np.float32), allow_pickle=False)
            meta.update({"rows": len(emb), "ids": emb.ids, "labels": emb.labels,
                         "values": emb.values})  # fmt: skip
    write_meta(out / f"{name}.done.json", FORMAT + ".shard", FORMAT_VERSION, {"shard": shard})


def read_embedding_shards(directory: str | Path) -> tuple[dict[str, Embeddings], dict]:
    """Load all finished shards of an embeddings dir -> per-modality :class:`Embeddings` + meta."""
    root = Path(directory)
    meta = read_json_meta(
        root / META, "embeddings dir", "create it with `modalign embed`", format=FORMAT
    )
    out: dict[str, Embeddings] = {}
    for m in meta.get("modalities", []):
        parts = sorted((root / m).glob("part-*.json")) if (root / m).is_dir() else []
        chunks = [_read_part(part, m, int(meta["dim"])) for part in parts]
        if chunks:
            out[m] = concat(chunks, m, int(meta["dim"]))
    return out, meta


def _read_part(part: Path, modality: str, dim: int) -> Embeddings:
    try:
        info = json.loads(part.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{part}: unreadable shard ({exc}); delete it and rerun") from None
    verify_files(part.parent, info, "embedding shard")
    vec = np.load(part.with_suffix(".npy"), allow_pickle=False)
    ids = [str(i) for i in info["ids"]]
    if vec.shape != (len(ids), dim) or len(ids) != info["rows"]:
        raise UserInputError(
            f"{part}: shard is inconsistent ({vec.shape} vectors, {len(ids)} ids); delete it and "
            "rerun `modalign embed`"
        )
    labels = info.get("labels", [None] * len(ids))
    values = info.get("values", [""] * len(ids))
    return Embeddings(modality, ids, vec.astype(np.float32), labels, values)
