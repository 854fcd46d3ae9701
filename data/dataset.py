"""Map-style paired dataset, the iterable-source base class, and rank-aware sampling.

Bad items travel inside the batch (``batch.bad``) and are tallied by a :class:`BadItemLog`
owned by the run, so counts are right with any number of workers and no global state.
:class:`Batch`, :class:`Collate`, :class:`BadRecord` and :class:`BadItemLog` live in
:mod:`modalign.data.batch` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from modalign.core.world import resolve_world
from modalign.data.batch import (
    BadItemLog,
    BadRecord,
    Batch,
    BatchHook,
    Collate,
    HookedCollate,
    Sample,
    make_collate,
)
from modalign.data.cache import ItemCache
from modalign.data.manifest import Manifest, ManifestRow
from modalign.data.modality import ModalitySpec
from modalign.data.sample import decode_sample

__all__ = [
    "BadItemLog",
    "BadRecord",
    "Batch",
    "BatchHook",
    "Collate",
    "EpochBatchSampler",
    "HookedCollate",
    "PairedDataset",
    "RawSource",
    "Sample",
    "make_loader",
    "row_values",
]


class PairedDataset(Dataset):
    """Rows of a manifest decoded into :class:`Sample` s (by :func:`decode_sample`).

    Index ``epoch * len(self) + i`` decodes row ``i`` with augmentation randomness seeded by
    (seed, epoch, i), so results do not depend on worker count or order.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        modalities: Mapping[str, ModalitySpec],
        train: bool = False,
        seed: int = 0,
        source: str = "",
        cache: ItemCache | None = None,
    ) -> None:
        self.rows = list(rows)
        self.modalities = dict(modalities)
        self.train = train
        self.seed = seed
        self.source = source
        self.cache = cache  # decoded-item cache (modalign.data.cache); None = decode every epoch

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        modalities: Mapping[str, ModalitySpec],
        train: bool = False,
        seed: int = 0,
        cache: ItemCache | None = None,
    ) -> PairedDataset:
        return cls(manifest.rows, modalities, train, seed, str(manifest.path), cache)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        epoch, i = divmod(int(index), len(self.rows))
        row = self.rows[i]
        return decode_sample(
            row_values(row, self.modalities),
            self.modalities,
            self.train,
            np.random.default_rng([self.seed, epoch, i]),
            id=row.id,
            label=row.label,
            index=i,
            where=f"{self.source}:{row.line}" if self.source else row.id,
            cache=self.cache,
        )


def row_values(row: ManifestRow, specs: Mapping[str, ModalitySpec]) -> dict[str, tuple[str, Any]]:
    """A manifest row's raw values as ``(origin, value)`` for :func:`decode_sample`.

    ``origin`` is ``""`` for an inline value, the path of a file, and ``<N-byte cell>`` for
    media bytes held in the manifest itself (a Parquet byte cell), never the bytes.
    """
    return {
        m: ("" if spec.inline else v if isinstance(v, str) else f"<{len(v)}-byte cell>", v)
        for m, spec in specs.items()
        if (v := row.values.get(m)) is not None
    }


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches from a (seed, epoch) permutation, split contiguously across ranks.

    Global batch ``b`` is ``perm[b*G:(b+1)*G]`` with ``G = batch_size * world_size``; rank ``r``
    takes its ``batch_size`` slice, so gathering the ranks' features in rank order reproduces the
    single-process batch exactly. Incomplete global batches are dropped (contrastive batches need
    equal sizes on every rank). Indices are ``epoch * n + i`` (see :class:`PairedDataset`).
    ``start_batch`` resumes mid-epoch without repeating or skipping data.

    ``endless=True`` goes on epoch after epoch from (``epoch``, ``start_batch``): one DataLoader
    over it keeps its workers (and their decoded-item caches) for a whole run instead of starting
    them every epoch; :meth:`endless_from` starts it at a global micro-batch position.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epoch: int = 0,
        start_batch: int = 0,
        drop_last: bool = True,
        endless: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.n, self.batch_size, self.rank, self.world = num_items, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch, self.start_batch = seed, shuffle, epoch, start_batch
        self.drop_last, self.endless = drop_last, endless
        if endless and self.batches_per_epoch() == 0:
            raise ValueError(f"{num_items} items make no full batch of {self.global_batch}")

    @classmethod
    def endless_from(
        cls,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ) -> EpochBatchSampler:
        """Endless batches from global micro-batch ``start`` (``epoch * per_epoch + batch``)."""
        sampler = cls(num_items, batch_size, rank, world_size, seed, shuffle, endless=True)
        sampler.epoch, sampler.start_batch = divmod(start, sampler.batches_per_epoch())
        return sampler

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless EpochBatchSampler has no length")
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start_batch = self.epoch, self.start_batch
        while True:
            yield from self._epoch(epoch, start_batch)
            if not self.endless:
                return
            epoch, start_batch = epoch + 1, 0

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n)
        offset = epoch * self.n
        for b in range(start_batch, self.batches_per_epoch()):
            lo = b * self.global_batch + self.rank * self.batch_size
            chunk = perm[lo : min(lo + self.batch_size, self.n)]
            yield [offset + int(i) for i in chunk]


def make_loader(
    dataset: PairedDataset,
    sampler: Sampler[list[int]] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    keep_empty: bool = False,
    prefetch_factor: int = 2,
    batch_hook: BatchHook | None = None,
) -> DataLoader:
    """DataLoader over a paired dataset; without a sampler, items in order (evaluation).

    ``keep_empty`` keeps rows whose every modality failed as all-absent rows (see :class:`Collate`);
    ``prefetch_factor`` batches per worker are decoded ahead (ignored without workers);
    ``batch_hook`` runs on every collated batch inside the loader (see :class:`HookedCollate`).
    """
    collate = make_collate(dataset.modalities, keep_empty, batch_hook)
    if sampler is None:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=False,
    )


class RawSource(IterableDataset):
    """An iterable source whose records are cheap to read and skip; decoding comes after.

    Subclasses give ``raw(worker, num_workers)`` (this rank's records for ``self.epoch``, for one
    DataLoader worker, in a deterministic order), ``decode(raw, position)`` (record ->
    :class:`Sample`, as :meth:`PairedDataset.__getitem__` returns) and ``counts(num_workers)`` (records per worker).
    Resuming sets ``skip`` (records to pass over, per worker) and ``worker_offset`` (which worker
    the DataLoader's round-robin starts at); :class:`~modalign.data.stream.SourceStream` does that.
    """

    def __init__(
        self,
        modalities: Mapping[str, ModalitySpec],
        train: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        source: str = "",
        cache: ItemCache | None = None,
    ) -> None:
        self.modalities = dict(modalities)
        self.train, self.seed, self.shuffle, self.source = train, seed, shuffle, source
        self.cache = cache  # decoded-item cache used by decode(); None = decode every epoch
        self.rank, self.world = resolve_world(rank, world_size)
        self.epoch = 0
        self.skip: list[int] = []
        self.worker_offset = 0
        self.skipped: dict[str, int] = {}  # rows dropped while reading (manifests), by reason
        self.skipped_examples: list[str] = []

    def batches(
        self, batch_size: int, num_workers: int = 0, keep_empty: bool = False
    ) -> Iterator[Batch]:
        """One pass over this epoch's records as :class:`Batch` es (evaluation, embedding)."""
        loader = DataLoader(
            self,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=Collate(self.modalities, keep_empty=keep_empty),
        )
        return iter(loader)

    def set_epoch(self, epoch: int) -> None:
        """Select the (seed, epoch) order; call before creating the DataLoader iterator."""
        self.epoch = epoch

    def raw(self, worker: int, num_workers: int) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, raw: Any, position: int) -> Sample:
        raise NotImplementedError

    def counts(self, num_workers: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.worker_offset) % num_workers
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for position, raw in enumerate(self.raw(worker, num_workers)):
            if position >= skip:
                yield self.decode(raw, position)
