"""The one embedding loop: any source (manifest or shard pattern) -> per-modality embeddings.

Every caller (``evaluate retrieval``, ``index build``, fine-tuning features, the trainer's
validation through a wrapper of its live encoder, and the resumable ``modalign embed`` shards in
:mod:`modalign.retrieval.embed_shards`) goes through :func:`embed_batches`; sources are opened
by the data layer (:func:`~modalign.data.sources.open_eval_source`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from modalign.core.errors import DataError
from modalign.data.dataset import BadItemLog, Batch, RawSource
from modalign.data.modality import ModalitySpec
from modalign.data.sources import ManifestSource, open_eval_source


@dataclass
class Embeddings:
    """One modality's vectors for a set of items (row-aligned lists)."""

    modality: str
    ids: list[str]
    vectors: np.ndarray  # (n, D) float32
    labels: list[str | None] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # file path or inline text per item
    positions: list[int] = field(default_factory=list)  # item position in the source

    def __len__(self) -> int:
        return len(self.ids)


class EncoderModel(Protocol):
    """What the loop needs from a model: a loaded bundle, or a wrapper of a live encoder."""

    @property
    def modalities(self) -> list[str]: ...

    @property
    def embed_dim(self) -> int: ...

    def modality_specs(self) -> dict[str, ModalitySpec]: ...

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


ValueOf = Callable[[str, int, str, Any], str]


def value_reader(source: RawSource, src: str | Path) -> ValueOf:
    """How an item is shown in results: its manifest cell (path/text), else ``SRC#id``."""
    manifest = source.manifest if isinstance(source, ManifestSource) else None

    def value_of(modality: str, position: int, item_id: str, decoded: Any) -> str:
        if manifest is not None:
            return str(manifest.rows[position].values[modality])
        if isinstance(decoded, str):
            return decoded  # inline values (text) are their own display value
        return f"{src}#{item_id}"

    return value_of


def embed_batches(
    model: EncoderModel,
    batches: Iterable[Batch],
    wanted: Sequence[str],
    value_of: ValueOf,
    bad: BadItemLog | None = None,
    max_items: int | None = None,
) -> Iterator[dict[str, Embeddings]]:
    """Encode each batch; yields, per batch, the present items of every wanted modality.

    ``max_items`` stops after that many batch rows (the last batch is cut to fit).
    """
    seen = 0
    for batch in batches:
        if max_items is not None and seen >= max_items:
            break
        if bad is not None:
            bad.add(batch.bad)
        rows = len(batch) if max_items is None else min(len(batch), max_items - seen)
        seen += rows
        encoded = model.encode_batch({m: batch.inputs[m] for m in wanted if m in batch.inputs})
        out: dict[str, Embeddings] = {}
        for m, vectors in encoded.items():
            keep = [i for i in batch.present[m].nonzero().flatten().tolist() if i < rows]
            inputs = batch.inputs[m]
            pos = [int(batch.index[i]) for i in keep]
            out[m] = Embeddings(
                m,
                [batch.ids[i] for i in keep],
                vectors[keep].numpy().astype(np.float32).reshape(len(keep), vectors.shape[-1]),
                [batch.labels[i] for i in keep],
                [value_of(m, p, batch.ids[i], _item(inputs, i)) for p, i in zip(pos, keep)],
                pos,
            )
        yield out


def _item(inputs: Any, i: int) -> Any:
    return inputs[i] if isinstance(inputs, list) else None


def concat(parts: Sequence[Embeddings], modality: str, dim: int) -> Embeddings:
    """Join row-aligned chunks of one modality."""
    out = Embeddings(modality, [], np.zeros((0, dim), np.float32))
    for p in parts:
        out.ids += p.ids
        out.labels += p.labels
        out.values += p.values
        out.positions += p.positions
    if parts:
        out.vectors = np.concatenate([p.vectors for p in parts]).astype(np.float32)
    return out


def wanted_specs(
    model: EncoderModel, modalities: Sequence[str] | None = None
) -> dict[str, ModalitySpec]:
    specs = model.modality_specs()
    return {m: specs[m] for m in (modalities or model.modalities) if m in specs}


def embed_source(
    model: EncoderModel,
    src: str | Path,
    modalities: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    *,
    train: bool = False,
    max_items: int | None = None,
) -> tuple[dict[str, Embeddings], BadItemLog]:
    """Embed any source (manifest or shard pattern) in memory, in file order.

    ``train=True`` decodes with training transforms (augmented views, e.g. for feature
    augmentation); ``max_items`` stops after that many items. Bad items are skipped and counted.
    """
    specs = wanted_specs(model, modalities)
    source = open_embed_source(src, specs, train)
    bad = BadItemLog()
    bad.add_counts(source.skipped, source.skipped_examples)
    chunks: dict[str, list[Embeddings]] = {m: [] for m in specs}
    batches = source.batches(batch_size, num_workers)
    for part in embed_batches(model, batches, list(specs), value_reader(source, src), bad,
                              max_items):  # fmt: skip
        for m, e in part.items():
            chunks[m].append(e)
    embedded = {m: concat(c, m, model.embed_dim) for m, c in chunks.items()}
    embedded = {m: e for m, e in embedded.items() if len(e)}
    if not embedded:
        raise DataError(f"{src}: no item could be embedded ({bad.summary()})")
    return embedded, bad


def open_embed_source(src: str | Path, specs: dict[str, ModalitySpec], train: bool) -> RawSource:
    """One pass over ``src`` in file order, on one process (train transforms when ``train``)."""
    if train:
        from modalign.data.sources import open_source

        return open_source(src, specs, train=True, shuffle=False, rank=0, world_size=1)
    return open_eval_source(src, specs, rank=0, world_size=1)
