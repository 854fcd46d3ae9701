"""Embedding a corpus with a model bundle: in memory, or streamed to resumable shards.

Shard format (``modalign embed --out DIR``), readable by any tool::

    DIR/embeddings.json             {"format": "modalign.embeddings", "fingerprint", "dim",
                                     "modalities", "source", "shard_rows", "shards": N}
    DIR/<modality>/part-000000.npy  (n, dim) float32, L2-normalised
    DIR/<modality>/part-000000.ids  one item id per line, same order
    DIR/<modality>/part-000000.json {"rows": n, "labels": [...], "values": [paths or texts]}

Shard i covers manifest rows [i*shard_rows, (i+1)*shard_rows); a shard exists only when all of
its files were written (the ``.json`` goes last, via rename), so a rerun skips finished shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modalign.core.artifact import atomic_write_text, read_json_meta
from modalign.core.errors import DataError, UserInputError
from modalign.data.dataset import BadItemLog, PairedDataset, make_loader
from modalign.data.manifest import ManifestRow, read_manifest
from modalign.pretrain.bundle import BundleModel

FORMAT = "modalign.embeddings"


@dataclass
class Embeddings:
    """One modality's vectors for a set of items (row-aligned lists)."""

    modality: str
    ids: list[str]
    vectors: np.ndarray  # (n, D) float32
    labels: list[str | None] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # file path or inline text per item

    def __len__(self) -> int:
        return len(self.ids)


def embed_rows(
    model: BundleModel,
    rows: Sequence[ManifestRow],
    modalities: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    bad: BadItemLog | None = None,
    source: str = "",
) -> dict[str, Embeddings]:
    """Embed every present modality of ``rows``; bad items are skipped and logged in ``bad``."""
    specs = model.modality_specs()
    wanted = [m for m in (modalities or model.modalities) if m in specs]
    dataset = PairedDataset(rows, {m: specs[m] for m in wanted}, train=False, source=source)
    out = {m: Embeddings(m, [], np.zeros((0, model.embed_dim), np.float32)) for m in wanted}
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in wanted}
    for batch in make_loader(dataset, batch_size=batch_size, num_workers=num_workers):
        if bad is not None:
            bad.add(batch["bad"])
        embedded = model.encode_batch({m: batch[m] for m in wanted if m in batch})
        for m, vectors in embedded.items():
            mask = batch["present"][m]
            keep = mask.nonzero().flatten().tolist()
            chunks[m].append(vectors[mask].numpy())
            out[m].ids.extend(batch["id"][i] for i in keep)
            out[m].labels.extend(batch["label"][i] for i in keep)
            out[m].values.extend(rows[int(batch["index"][i])].values[m] for i in keep)
    for m in wanted:
        if chunks[m]:
            out[m].vectors = np.concatenate(chunks[m]).astype(np.float32)
    return {m: e for m, e in out.items() if len(e)}


def embed_source(
    model: BundleModel,
    src: str | Path,
    modalities: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[dict[str, Embeddings], BadItemLog]:
    """Embed a manifest in memory (for evaluation and fine-tuning)."""
    specs = model.modality_specs()
    manifest = read_manifest(src, list(specs), inline=[m for m, s in specs.items() if s.inline])
    bad = BadItemLog()
    bad.add_counts(manifest.skipped, manifest.skipped_examples)
    embedded = embed_rows(
        model, manifest.rows, modalities, batch_size, num_workers, bad, str(manifest.path)
    )
    if not embedded:
        raise DataError(f"{src}: no item could be embedded ({bad.summary()})")
    return embedded, bad


def write_embedding_shards(
    model: BundleModel,
    src: str | Path,
    out_dir: str | Path,
    shard_rows: int = 10_000,
    batch_size: int = 64,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Stream a manifest into embedding shards; memory holds one shard; finished shards are kept.

    Process ``rank`` of ``world_size`` writes shards ``rank, rank + world_size, ...``.
    """
    out = Path(out_dir)
    specs = model.modality_specs()
    manifest = read_manifest(src, list(specs), inline=[m for m, s in specs.items() if s.inline])
    n_shards = (len(manifest.rows) + shard_rows - 1) // shard_rows
    meta_path = out / "embeddings.json"
    meta = {
        "format": FORMAT,
        "fingerprint": model.fingerprint,
        "dim": model.embed_dim,
        "modalities": model.modalities,
        "source": str(Path(src).resolve()),
        "shard_rows": shard_rows,
        "shards": n_shards,
        "model": str(Path(model.path).resolve()),
    }
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != model.fingerprint or old.get("shard_rows") != shard_rows:
            raise UserInputError(
                f"{out}: holds embeddings from another model or shard size; use a new --out dir"
            )
    if rank == 0:
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    bad = BadItemLog()
    written = skipped = 0
    for shard in range(rank, n_shards, world_size):
        name = f"part-{shard:06d}"
        if all(
            (out / m / f"{name}.json").is_file()
            for m in model.modalities
            if _shard_has(manifest.rows, shard, shard_rows, m)
        ):
            skipped += 1
            continue
        rows = manifest.rows[shard * shard_rows : (shard + 1) * shard_rows]
        for m, emb in embed_rows(
            model, rows, None, batch_size, num_workers, bad, str(manifest.path)
        ).items():
            _write_shard(out / m, name, emb)
        written += 1
    return {"shards": n_shards, "written": written, "already_done": skipped, **bad.to_dict()}


def _shard_has(rows: Sequence[ManifestRow], shard: int, size: int, modality: str) -> bool:
    return any(modality in r.values for r in rows[shard * size : (shard + 1) * size])


def _write_shard(directory: Path, name: str, emb: Embeddings) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.npy.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, emb.vectors.astype(np.float32))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / f"{name}.npy")
    atomic_write_text(directory / f"{name}.ids", "".join(f"{i}\n" for i in emb.ids))
    atomic_write_text(
        directory / f"{name}.json",
        json.dumps({"rows": len(emb), "labels": emb.labels, "values": emb.values}),
    )


def read_embedding_shards(directory: str | Path) -> tuple[dict[str, Embeddings], dict]:
    """Load all finished shards of an embeddings dir -> per-modality :class:`Embeddings` + meta."""
    root = Path(directory)
    meta = read_json_meta(
        root / "embeddings.json", "embeddings dir", "create it with `modalign embed`"
    )
    out: dict[str, Embeddings] = {}
    for m in meta.get("modalities", []):
        parts = sorted((root / m).glob("part-*.json")) if (root / m).is_dir() else []
        if not parts:
            continue
        vectors, ids, labels, values = [], [], [], []
        for part in parts:
            info = json.loads(part.read_text())
            stem = part.with_suffix("")
            vec = np.load(stem.with_suffix(".npy"), allow_pickle=False)
            part_ids = stem.with_suffix(".ids").read_text().splitlines()
            if vec.shape != (len(part_ids), meta["dim"]) or len(part_ids) != info["rows"]:
                raise UserInputError(
                    f"{part}: shard is inconsistent ({vec.shape} vectors, {len(part_ids)} ids); delete it and rerun `modalign embed`"
                )
            vectors.append(vec)
            ids.extend(part_ids)
            labels.extend(info.get("labels", [None] * len(part_ids)))
            values.extend(info.get("values", [""] * len(part_ids)))
        out[m] = Embeddings(m, ids, np.concatenate(vectors).astype(np.float32), labels, values)
    return out, meta
