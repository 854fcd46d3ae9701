"""Endless streams: resuming at position p yields exactly what an uninterrupted stream yields."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from modalign.core.errors import DataError
from modalign.data.dataset import Collate, PairedDataset
from modalign.data.manifest import read_manifest
from modalign.data.shards import ShardDataset
from modalign.data.sources import open_mix, open_source, open_stream
from modalign.data.stream import BatchStream, SourceStream, Stream, round_robin_split

from helpers.data import (  # noqa: F401 - specs/text_specs are fixtures
    batch_ids,
    png_bytes,
    small_specs,
    text_manifest,
    text_shards,
    write_manifest,
)


def take(stream, n: int) -> list[list[str]]:
    return batch_ids(list(itertools.islice(iter(stream), n)))


def test_batch_stream_resume_matches_uninterrupted(tmp_path: Path, text_specs) -> None:
    manifest = read_manifest(text_manifest(tmp_path, 23), ["text"])
    dataset = PairedDataset.from_manifest(manifest, text_specs, train=True, seed=5)
    full = take(BatchStream(dataset, 3, rank=1, world_size=2, seed=5), 12)  # 3 per epoch
    for p in (0, 1, 3, 5, 8):
        stream = BatchStream(dataset, 3, rank=1, world_size=2, seed=5, start=p)
        assert take(stream, 12 - p) == full[p:], p
        assert stream.position == 12


def test_round_robin_split_models_worker_exhaustion() -> None:
    # workers with 3, 1 and 2 batches: order w0 w1 w2 | w0 w2 | w0
    assert round_robin_split([3, 1, 2], 0) == ([0, 0, 0], 0)
    assert round_robin_split([3, 1, 2], 3) == ([1, 1, 1], 0)
    assert round_robin_split([3, 1, 2], 4) == ([2, 1, 1], 2)
    assert round_robin_split([3, 1, 2], 5) == ([2, 1, 2], 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resume_matches_uninterrupted(tmp_path: Path, text_specs, workers) -> None:
    # Unequal shards give workers unequal batch counts: resuming must model who ran out first.
    pattern = text_shards(tmp_path, [7, 13, 5, 9, 11, 3])

    def stream(start: int) -> SourceStream:
        source = ShardDataset(pattern, text_specs, train=True, seed=2, shuffle_buffer=8)
        return SourceStream(source, 3, num_workers=workers, start=start)

    per_epoch = sum(stream(0)._batches(c) for c in stream(0).source.counts(max(workers, 1)))
    total = 2 * per_epoch + 2
    full = take(stream(0), total)
    assert len({tuple(b) for b in full[:per_epoch]}) == per_epoch
    points = (1, per_epoch - 1, per_epoch + 3) if workers else range(0, total, 2)
    for p in points:
        assert take(stream(p), total - p) == full[p:], p


def test_mix_stream_resumes_too(tmp_path: Path, text_specs) -> None:
    shards = text_shards(tmp_path / "sh", [10, 12])
    manifest = text_manifest(tmp_path, 15)

    def stream(start: int) -> SourceStream:
        mix = open_mix({str(manifest): 2.0, shards: 1.0}, text_specs, train=True, seed=4)
        return SourceStream(mix, 4, start=start)

    full = take(stream(0), 12)
    for p in (2, 5, 9):
        assert take(stream(p), 12 - p) == full[p:]


def test_rows_with_every_modality_bad_keep_batch_size(tmp_path: Path, specs) -> None:
    (tmp_path / "ok.png").write_bytes(png_bytes())
    rows = [{"id": f"r{i}", "image": "ok.png" if i % 2 else "gone.png"} for i in range(8)]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    specs = {"image": specs["image"]}
    stream = open_stream(path, specs, batch_size=4, seed=0)
    batch = next(iter(stream))
    assert len(batch.ids) == 4 and int(batch.present["image"].sum()) == 2
    assert sorted(r.reason for r in batch.bad) == ["missing_file", "missing_file"]
    dataset = PairedDataset.from_manifest(read_manifest(path, ["image"]), specs)
    samples = [dataset[i] for i in range(4)]
    assert len(Collate(specs)(samples).ids) == 2  # evaluation default: dropped, as before
    assert len(Collate(specs, keep_empty=True)(samples).ids) == 4


def test_open_stream_kinds_and_empty_epoch(tmp_path: Path, text_specs) -> None:
    assert isinstance(open_stream(text_manifest(tmp_path, 8), text_specs, 4), BatchStream)
    shard_stream = open_stream(text_shards(tmp_path / "sh", [1, 2]), text_specs, 4, num_workers=0)
    assert isinstance(shard_stream, SourceStream)
    with pytest.raises(DataError, match="no full batch of 4"):
        next(iter(shard_stream))  # 3 items: an endless stream would spin forever
    src = open_source(text_shards(tmp_path / "sh2", [2, 2]), text_specs, train=True)
    assert torch.tensor(src.counts(2)).tolist() == [2, 2]


def test_mix_from_config_streams_and_resumes(tmp_path: Path, text_specs) -> None:
    from modalign.core.config_io import from_dict
    from modalign.data.config import DataConfig

    shards = text_shards(tmp_path / "sh", [10, 12])
    manifest = text_manifest(tmp_path, 15)
    cfg = from_dict(DataConfig, {"train": {str(manifest): 2, shards: 1}}, "data")
    assert cfg.train == {str(manifest): 2.0, shards: 1.0}

    def stream(start: int):
        return open_stream(cfg.train, text_specs, 4, seed=4, start=start)

    assert isinstance(stream(0), SourceStream) and isinstance(stream(0), Stream)
    one = open_stream(str(manifest), text_specs, 4, seed=4)
    assert isinstance(one, BatchStream) and isinstance(one, Stream)
    full = take(stream(0), 10)
    manual = open_mix({str(manifest): 2.0, shards: 1.0}, text_specs, train=True, seed=4)
    assert full == take(SourceStream(manual, 4), 10)  # the same draws as open_mix
    for p in (3, 7):
        assert take(stream(p), 10 - p) == full[p:]
