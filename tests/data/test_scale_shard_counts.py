"""Shard resume without a counting pass: counts come from data pack's index.json or
img2dataset's *_stats.json; a shard rewritten since is counted by reading it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from modalign.data import shards as shards_mod
from modalign.data.modality import modality_specs
from modalign.data.pack import pack_shards
from modalign.data.shards import ShardDataset
from modalign.data.sources import open_source

from helpers.embed import write_texts


@pytest.fixture
def tar_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real = shards_mod.iter_shard

    def counting(url: str):
        opened.append(url)
        return real(url)

    monkeypatch.setattr(shards_mod, "iter_shard", counting)
    return opened


def test_resume_reads_counts_from_the_pack_index(tmp_path: Path, tar_opens: list[str]) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 23)
    pattern = pack_shards(manifest, tmp_path / "sh", shard_size=5)["pattern"]
    specs = modality_specs(["text"])
    source = ShardDataset(pattern, specs, shuffle=False, rank=0, world_size=1)
    assert source.counts(2) == [13, 10] and tar_opens == []  # no tar was opened to count
    # a resume mid-epoch: the skip is planned from the counts, then only the rest is read
    resumed = open_source(pattern, specs, train=False, shuffle=False, rank=0, world_size=1)
    assert sum(resumed.counts(1)) == 23 and tar_opens == []
    first = next(iter(resumed.batches(4, 0)))
    assert len(first) == 4 and tar_opens  # reading data still opens shards, of course


def test_a_shard_rewritten_after_the_index_is_counted(tmp_path: Path, tar_opens) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 12)
    pattern = pack_shards(manifest, tmp_path / "sh", shard_size=5)["pattern"]
    shard = sorted((tmp_path / "sh").glob("*.tar"))[0]
    later = (tmp_path / "sh" / "index.json").stat().st_mtime_ns + 10**9
    os.utime(shard, ns=(later, later))
    source = ShardDataset(pattern, modality_specs(["text"]), shuffle=False, rank=0, world_size=1)
    assert source.counts(1) == [12] and tar_opens == [str(shard)]


def test_img2dataset_stats_files(tmp_path: Path, tar_opens: list[str]) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 9)
    pack_shards(manifest, tmp_path / "sh", shard_size=5)
    out = tmp_path / "img2ds"
    out.mkdir()
    for i, tar in enumerate(sorted((tmp_path / "sh").glob("*.tar"))):
        (out / f"{i:05d}_stats.json").write_text(json.dumps({"successes": [5, 4][i]}))
        shutil.copy(tar, out / f"{i:05d}.tar")
    for f in out.glob("*_stats.json"):
        later = (out / "00001.tar").stat().st_mtime_ns + 10**9
        os.utime(f, ns=(later, later))
    source = ShardDataset([str(out / "00000.tar"), str(out / "00001.tar")],
                         modality_specs(["text"]), shuffle=False, rank=0, world_size=1)  # fmt: skip
    assert source.counts(1) == [9] and tar_opens == []
