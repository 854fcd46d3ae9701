"""Open any ``SRC`` (manifest, WebDataset shard pattern, ``{SRC: weight}`` mix).

``SRC`` dispatch is by suffix: ``.jsonl/.csv/.parquet`` -> manifest, ``.tar/.tar.gz/.tgz``
(brace patterns, ``::`` lists, ``pipe:`` URLs) -> shards. Everything comes back as a
:class:`RawSource`, so :class:`~modalign.data.stream.SourceStream` can batch, resume and split it
across processes and workers the same way; :func:`open_stream` picks the exact global-batch
:class:`~modalign.data.stream.BatchStream` for a single manifest.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from modalign.core.errors import DataError
from modalign.data.batch import Batch, BatchHook, Collate, Sample
from modalign.data.cache import ItemCache
from modalign.data.dataset import PairedDataset, RawSource
from modalign.data.manifest import Manifest, is_manifest, read_manifest
from modalign.data.modality import ModalitySpec, check_name
from modalign.data.shards import (
    SHARD_SUFFIXES,
    ShardDataset,
    folder_shards,
    is_shard_pattern,
    stable_hash,
)
from modalign.data.stream import BatchStream, SourceStream


class ManifestSource(RawSource):
    """A manifest as an iterable: (seed, epoch) permutation, split ``rank::world`` then by worker."""

    def __init__(
        self,
        dataset: PairedDataset,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        super().__init__(
            dataset.modalities,
            dataset.train,
            dataset.seed,
            shuffle,
            rank,
            world_size,
            dataset.source,
            dataset.cache,
        )
        self.dataset = dataset
        self.manifest = manifest
        if manifest is not None:
            self.skipped = dict(manifest.skipped)
            self.skipped_examples = list(manifest.skipped_examples)

    def _rank_rows(self) -> list[int]:
        n = len(self.dataset)
        order = list(range(n))
        if self.shuffle:
            random.Random(stable_hash(self.seed, self.epoch, "rows")).shuffle(order)
        return order[self.rank :: self.world]

    def raw(self, worker: int, num_workers: int) -> Iterator[int]:
        return iter(self._rank_rows()[worker::num_workers])

    def counts(self, num_workers: int) -> list[int]:
        n = len(range(self.rank, len(self.dataset), self.world))
        return [len(range(w, n, num_workers)) for w in range(num_workers)]

    def batches(
        self, batch_size: int, num_workers: int = 0, keep_empty: bool = False
    ) -> Iterator[Batch]:
        """One pass over this rank's rows, in order for any ``num_workers`` (map-style loader)."""
        offset = self.epoch * len(self.dataset)
        rows = [offset + i for i in self._rank_rows()]
        chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=chunks,
            num_workers=num_workers,
            collate_fn=Collate(self.modalities, keep_empty=keep_empty),
        )
        return iter(loader)

    def decode(self, raw: int, position: int) -> Sample:
        # PairedDataset seeds augmentation by (seed, epoch, row) from the index.
        return self.dataset[self.epoch * len(self.dataset) + raw]


class MixedSource(RawSource):
    """Weighted mix of sources: each draw picks a source with probability proportional to its weight.

    Per worker, the epoch ends when a drawn source has run out, so every epoch follows the weights
    (nothing is oversampled); the next epoch reshuffles every source. Sources that give a worker
    nothing at all are left out of its draws. Draws are seeded by (seed, epoch, rank, worker).
    """

    def __init__(
        self, sources: Sequence[RawSource], weights: Sequence[float] | None = None, seed: int = 0
    ) -> None:
        if not sources:
            raise DataError("a mix needs at least one source")
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources) or any(w <= 0 for w in weights):
            raise DataError(f"mix weights {weights} must be positive, one per source")
        modalities: dict[str, ModalitySpec] = {}
        for s in sources:
            modalities.update(s.modalities)
        first = sources[0]
        names = " + ".join(s.source for s in sources)
        super().__init__(
            modalities, first.train, seed, first.shuffle, first.rank, first.world, names
        )
        self.sources, self.weights = list(sources), weights
        for s in sources:
            for reason, n in s.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            self.skipped_examples.extend(s.skipped_examples)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for s in self.sources:
            s.set_epoch(epoch)

    def _rng(self, worker: int, num_workers: int) -> random.Random:
        return random.Random(stable_hash(self.seed, self.epoch, self.rank, worker, num_workers))

    def raw(self, worker: int, num_workers: int) -> Iterator[tuple[int, Any]]:
        iters, live = [], []
        for i, s in enumerate(self.sources):
            it = iter(s.raw(worker, num_workers))
            head = next(it, _END)  # peek: a source empty for this worker is left out
            iters.append((head, it))
            if head is not _END:
                live.append(i)
        pending = {i: iters[i][0] for i in live}
        rng = self._rng(worker, num_workers)
        weights = [self.weights[i] for i in live]
        while live:
            i = rng.choices(live, weights)[0]
            item = pending.pop(i) if i in pending else next(iters[i][1], _END)
            if item is _END:
                return
            yield i, item

    def counts(self, num_workers: int) -> list[int]:
        per_source = [s.counts(num_workers) for s in self.sources]
        out = []
        for w in range(num_workers):
            left = {i: c[w] for i, c in enumerate(per_source) if c[w] > 0}
            live = list(left)
            weights = [self.weights[i] for i in live]
            rng, n = self._rng(w, num_workers), 0
            while live:  # replay the draws of raw() without reading any data
                i = rng.choices(live, weights)[0]
                if left[i] == 0:
                    break
                left[i] -= 1
                n += 1
            out.append(n)
        return out

    def decode(self, raw: tuple[int, Any], position: int) -> Sample:
        i, item = raw
        return self.sources[i].decode(item, position)


_END = object()


Src = str | Path | Mapping[str, float]


def open_source(
    src: Src,
    specs: Mapping[str, ModalitySpec],
    train: bool = False,
    seed: int = 0,
    shuffle: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    cache: ItemCache | None = None,
) -> RawSource:
    """Open a manifest, a shard pattern (``data pack`` or img2dataset shards) or a ``{SRC:
    weight}`` mix as a :class:`RawSource` (shuffled when ``train``; items decoded through
    ``cache`` when given, see :mod:`modalign.data.cache`).

    Raises :class:`DataError` naming the file for an unknown suffix, a missing file or shard, or a
    manifest without usable rows. Rows skipped while reading are on ``source.skipped``.
    """
    check_specs(specs)
    if isinstance(src, Mapping):
        return open_mix(src, specs, train, seed, rank, world_size, shuffle, cache)
    shuffle = train if shuffle is None else shuffle
    text = str(src)
    shard_args = (specs, train, seed, shuffle, shuffle_buffer, rank, world_size, cache)
    if is_shard_pattern(text):
        return ShardDataset(text, *shard_args)
    if is_manifest(text):
        manifest = read_manifest(text, specs)
        dataset = PairedDataset.from_manifest(manifest, specs, train, seed, cache)
        return ManifestSource(dataset, shuffle, rank, world_size, manifest=manifest)
    if Path(text).is_dir():  # an img2dataset / data pack output folder: its shards, sorted
        urls = shards_in(Path(text))
        source = ShardDataset(urls, *shard_args)
        source.source = text
        return source
    raise DataError(
        f"{text}: not a manifest (.jsonl/.csv/.parquet), a WebDataset shard pattern "
        f"({'/'.join(SHARD_SUFFIXES)}) or a folder of shards"
    )


def shards_in(folder: Path) -> list[str]:
    """The shard files directly inside ``folder``, sorted; DataError naming it when none."""
    urls = folder_shards(folder)  # checked against index.json / img2dataset stats
    if not urls:
        raise DataError(
            f"{folder}: folder holds no shards ({'/'.join(SHARD_SUFFIXES)}); pass a manifest, "
            "a shard pattern or a folder written by data pack / img2dataset"
        )
    return urls


def open_mix(
    sources: Mapping[str, float] | Sequence[str],
    specs: Mapping[str, ModalitySpec],
    train: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool | None = None,
    cache: ItemCache | None = None,
) -> RawSource:
    """Several SRCs mixed by weight (``{src: weight}``; a plain list weighs them equally)."""
    weighted = dict(sources) if isinstance(sources, Mapping) else dict.fromkeys(sources, 1.0)
    if not weighted:
        raise DataError("a mix needs at least one source (data.train: {SRC: weight, ...})")
    opened = [
        open_source(str(s), specs, train, seed, shuffle, rank, world_size, cache=cache)
        for s in weighted
    ]
    if len(opened) == 1:
        return opened[0]
    return MixedSource(opened, list(weighted.values()), seed=seed)


def open_eval_source(
    src: Src,
    specs: Mapping[str, ModalitySpec],
    rank: int = 0,
    world_size: int = 1,
) -> RawSource:
    """Any SRC for one pass in file order (no shuffle, no augmentation): embed, index, evaluate,
    finetune and predict read manifests and shards through this. Iterate it with
    ``source.batches(batch_size)``; rows skipped while reading are on ``source.skipped``."""
    return open_source(src, specs, train=False, shuffle=False, rank=rank, world_size=world_size)


def open_stream(
    src: Src,
    specs: Mapping[str, ModalitySpec],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    start: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    cache: ItemCache | None = None,
    prefetch_factor: int = 2,
    batch_hook: BatchHook | None = None,
) -> BatchStream | SourceStream:
    """Endless training micro-batches for this process from ``src`` (resume with ``start``).

    A manifest gets :class:`BatchStream` (global batches split across processes exactly as one
    process would see them; one loader for the whole run); shards and ``{SRC: weight}`` mixes
    get :class:`SourceStream` (workers restart each epoch: a ``memory`` cache there only helps
    without workers, use ``disk``). Both carry ``position`` and read-time problems in
    ``skipped``/``skipped_examples`` (for a BadItemLog). ``cache``: see
    :mod:`modalign.data.cache`; results are the same with and without it. ``batch_hook``
    runs on every collated batch inside the loader (its workers, when ``num_workers > 0``).
    """
    source = open_source(src, specs, train=True, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, cache=cache)  # fmt: skip
    stream: BatchStream | SourceStream
    if isinstance(source, ManifestSource):
        stream = BatchStream(
            source.dataset, batch_size, source.rank, source.world, seed, shuffle, num_workers,
            start, prefetch_factor, batch_hook,
        )  # fmt: skip
        manifest = source.manifest
        stream.skipped = dict(manifest.skipped) if manifest else {}
        stream.skipped_examples = list(manifest.skipped_examples) if manifest else []
        return stream
    stream = SourceStream(
        source, batch_size, num_workers=num_workers, start=start,
        prefetch_factor=prefetch_factor, batch_hook=batch_hook,
    )  # fmt: skip
    stream.skipped = dict(source.skipped)
    stream.skipped_examples = list(source.skipped_examples)
    return stream


def check_specs(specs: Mapping[str, ModalitySpec]) -> None:
    """Every spec's name is a valid modality name (not a reserved column: ConfigError)."""
    for name in specs:
        check_name(name, "modalities")
