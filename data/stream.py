"""Endless, resumable streams of training micro-batches for one process."""

from __future__ import annotations

from collections.abc import Iterator

from modalign.data.dataset import Batch, EpochBatchSampler, PairedDataset, make_loader
from modalign.data.errors import DataError


class BatchStream:
    """Micro-batches for this rank across epochs; ``position`` counts micro-batches consumed.

    Restarting with ``start=position`` continues exactly where a run stopped: the epoch's
    permutation depends only on (seed, epoch), so nothing is repeated or skipped.
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
    ) -> None:
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world_size
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.position = start
        probe = EpochBatchSampler(len(dataset), batch_size, rank, world_size)
        self.per_epoch = probe.batches_per_epoch()
        if self.per_epoch == 0:
            raise DataError(
                f"{dataset.source or 'dataset'}: {len(dataset)} items is fewer than one global batch "
                f"({probe.global_batch} = train.batch_size x processes); lower train.batch_size"
            )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            epoch, start_batch = divmod(self.position, self.per_epoch)
            sampler = EpochBatchSampler(
                len(self.dataset),
                self.batch_size,
                self.rank,
                self.world,
                seed=self.seed,
                shuffle=self.shuffle,
                epoch=epoch,
                start_batch=start_batch,
            )
            for batch in make_loader(self.dataset, sampler, num_workers=self.num_workers):
                self.position += 1
                yield batch
