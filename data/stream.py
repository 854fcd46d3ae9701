"""Endless, resumable streams of training micro-batches for one process.

One interface, :class:`Stream`, and one resume rule: ``position`` counts the micro-batches this
process has consumed, and a stream built with ``start=position`` (same source, seed, batch size,
process count and workers) yields exactly what the uninterrupted stream yields after them.
:class:`BatchStream` serves a manifest (global batches split across processes, so N processes
see what one process sees); :class:`SourceStream` serves any :class:`RawSource` (WebDataset
shards, weighted mixes). :func:`~modalign.data.sources.open_stream` picks one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch.utils.data import DataLoader

from modalign.core.errors import DataError
from modalign.data.batch import make_collate
from modalign.data.dataset import (
    Batch,
    BatchHook,
    EpochBatchSampler,
    PairedDataset,
    RawSource,
    make_loader,
)


@runtime_checkable
class Stream(Protocol):
    """Endless training micro-batches with a resume position (see the module docstring)."""

    position: int  # micro-batches consumed so far; pass as ``start`` to resume
    skipped: dict[str, int]  # rows dropped while reading the source, by reason
    skipped_examples: list[str]

    def __iter__(self) -> Iterator[Batch]: ...


class BatchStream:
    """Micro-batches for this rank across epochs; ``position`` counts micro-batches consumed.

    Restarting with ``start=position`` continues exactly where a run stopped: the epoch's
    permutation depends only on (seed, epoch), so nothing is repeated or skipped. Rows whose every
    modality failed stay in their batch as all-absent rows, so all processes see equal sizes.
    """

    def __init__(
        self,
        dataset: PairedDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        start: int = 0,
        prefetch_factor: int = 2,
        batch_hook: BatchHook | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world_size
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.prefetch_factor, self.batch_hook = prefetch_factor, batch_hook
        self.position = start
        self.skipped: dict[str, int] = {}  # manifest rows skipped at read time (see open_stream)
        self.skipped_examples: list[str] = []
        probe = EpochBatchSampler(len(dataset), batch_size, rank, world_size)
        self.per_epoch = probe.batches_per_epoch()
        if self.per_epoch == 0:
            raise DataError(
                f"{dataset.source or 'dataset'}: {len(dataset)} items is fewer than one global batch "
                f"({probe.global_batch} = train.batch_size x processes); lower train.batch_size"
            )

    @property
    def rows(self) -> int | None:
        """Usable rows of the manifest (all processes together; rows skipped at read time are in
        ``skipped``)."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        # One loader over every epoch: workers start once and keep their memory caches.
        sampler = EpochBatchSampler.endless_from(
            len(self.dataset), self.batch_size, self.rank, self.world, self.seed, self.shuffle,
            start=self.position,
        )  # fmt: skip
        loader = make_loader(
            self.dataset, sampler, num_workers=self.num_workers, keep_empty=True,
            prefetch_factor=self.prefetch_factor, batch_hook=self.batch_hook,
        )  # fmt: skip
        for batch in loader:
            self.position += 1
            yield batch


class SourceStream:
    """Endless, resumable micro-batches from a :class:`RawSource` (shards, a mix, ...).

    ``position`` counts micro-batches this process has consumed, across epochs; each epoch
    re-reads the source in its (seed, epoch) order. Batches are formed inside each DataLoader
    worker (``batch_size`` records of that worker's stream; with ``drop_last`` the worker's last
    partial batch is dropped) and come out round-robin over workers, as PyTorch's DataLoader
    yields them.

    Resume guarantee: ``SourceStream(source, ..., start=p)`` yields exactly the batches that an
    uninterrupted stream yields after its first ``p``, same contents and order, provided the
    source (same shards and contents), seed, shuffle settings, process count, ``batch_size``,
    ``num_workers`` and ``drop_last`` are unchanged. To get there it needs every worker's record
    count per epoch: the first resume reads each shard once without decoding (counts are cached
    on the source), then each worker passes over its consumed records without decoding them.
    Batches keep rows whose every modality failed as all-absent rows (``keep_empty``) so batch
    sizes stay equal across processes.
    """

    def __init__(
        self,
        source: RawSource,
        batch_size: int,
        num_workers: int = 0,
        start: int = 0,
        drop_last: bool = True,
        keep_empty: bool = True,
        prefetch_factor: int = 2,
        batch_hook: BatchHook | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.source, self.batch_size, self.num_workers = source, batch_size, num_workers
        self.prefetch_factor, self.batch_hook = prefetch_factor, batch_hook
        self.drop_last, self.keep_empty = drop_last, keep_empty
        self.position = start
        self.skipped: dict[str, int] = {}
        self.skipped_examples: list[str] = []

    @property
    def rows(self) -> int | None:
        """None: shards and mixes are not read ahead to count their records."""
        return None

    def locate(self, position: int) -> tuple[int, list[int], int]:
        """(epoch, batches consumed per worker in that epoch, worker the round-robin resumes at)."""
        workers = max(self.num_workers, 1)
        epoch, remaining = 0, position
        while True:
            self.source.set_epoch(epoch)
            per_worker = [self._batches(c) for c in self.source.counts(workers)]
            total = sum(per_worker)
            if total == 0:
                raise DataError(self._empty_message(epoch))
            if remaining < total:
                consumed, next_worker = round_robin_split(per_worker, remaining)
                return epoch, consumed, next_worker
            remaining -= total
            epoch += 1

    def _batches(self, records: int) -> int:
        full, rest = divmod(records, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _empty_message(self, epoch: int) -> str:
        return (
            f"{self.source.source or 'source'}: epoch {epoch} gives this process no full batch of "
            f"{self.batch_size} (rank {self.source.rank} of {self.source.world}, "
            f"{max(self.num_workers, 1)} workers); lower train.batch_size or data.num_workers"
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch, consumed, offset = self.locate(self.position) if self.position else (0, [], 0)
        collate = make_collate(self.source.modalities, self.keep_empty, self.batch_hook)
        while True:
            self.source.set_epoch(epoch)
            self.source.skip = [c * self.batch_size for c in consumed]
            self.source.worker_offset = offset
            loader = DataLoader(
                self.source,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate,
                drop_last=self.drop_last,
                prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            )
            produced = 0
            for batch in loader:
                produced += 1
                self.position += 1
                yield batch
            if produced == 0 and not any(consumed):
                raise DataError(self._empty_message(epoch))
            epoch, consumed, offset = epoch + 1, [], 0


def round_robin_split(per_worker: list[int], taken: int) -> tuple[list[int], int]:
    """How many of the first ``taken`` round-robin batches came from each worker, and which
    worker yields next; a worker that has run out drops out of the rotation (as in DataLoader)."""
    consumed = [0] * len(per_worker)
    round_no = 0
    while True:
        for w, n in enumerate(per_worker):
            if n > round_no:
                if taken == 0:
                    return consumed, w
                consumed[w] += 1
                taken -= 1
        round_no += 1
