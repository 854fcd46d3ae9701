"""The one embedding loop: any source, max_items, and resumable shards keyed on the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.data.pack import pack_shards
from modalign.retrieval.embed import embed_source
from modalign.retrieval.embed_shards import read_embedding_shards, write_embedding_shards

from helpers.embed import HashModel, write_texts


def test_manifest_and_shards_embed_alike_and_max_items(tmp_path: Path) -> None:
    manifest = write_texts(tmp_path / "c" / "m.jsonl", 13)
    pattern = pack_shards(manifest, tmp_path / "sh", shard_size=5)["pattern"]
    a, bad = embed_source(HashModel(), manifest, batch_size=4)
    b, _ = embed_source(HashModel(), pattern, batch_size=4)
    assert a["text"].ids == b["text"].ids == [f"t{i}" for i in range(13)] and bad.total == 0
    np.testing.assert_array_equal(a["text"].vectors, b["text"].vectors)
    assert a["text"].values[0] == "caption number 0" == b["text"].values[0]
    few, _ = embed_source(HashModel(), manifest, batch_size=4, max_items=6)
    assert few["text"].ids == [f"t{i}" for i in range(6)]
    augmented, _ = embed_source(HashModel(), manifest, batch_size=4, train=True)
    assert augmented["text"].ids == a["text"].ids  # training transforms, still in file order


def test_shards_resume_and_refuse_another_source(tmp_path: Path) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 25)
    out = tmp_path / "emb"
    res = write_embedding_shards(HashModel(), manifest, out, shard_rows=10, batch_size=4)
    assert (res["shards"], res["written"]) == (3, 3)
    full, _ = read_embedding_shards(out)
    # a crash after shard 1: its marker and files are gone; the rerun redoes only that shard
    for f in [out / "part-000001.done.json", *(out / "text").glob("part-000001.*")]:
        f.unlink()
    res = write_embedding_shards(HashModel(), manifest, out, shard_rows=10, batch_size=4)
    assert (res["written"], res["already_done"]) == (1, 2)
    again, _ = read_embedding_shards(out)
    assert again["text"].ids == full["text"].ids
    np.testing.assert_array_equal(again["text"].vectors, full["text"].vectors)

    write_texts(manifest, 25, start=100)  # same path, other content
    with pytest.raises(UserInputError, match="differs in: source"):
        write_embedding_shards(HashModel(), manifest, out, shard_rows=10)
    (out / "text" / "part-000000.npy").write_bytes(b"torn")
    with pytest.raises(UserInputError, match="part-000000.npy: checksum"):
        read_embedding_shards(out)


def test_ranks_write_disjoint_blocks_that_read_back_in_order(tmp_path: Path) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 25)
    out = tmp_path / "emb"
    r1 = write_embedding_shards(HashModel(), manifest, out, shard_rows=4, rank=1, world_size=2)
    r0 = write_embedding_shards(HashModel(), manifest, out, shard_rows=4, rank=0, world_size=2)
    assert (r0["shards"], r0["written"], r1["written"]) == (7, 4, 3)
    emb, _ = read_embedding_shards(out)
    assert emb["text"].ids == [f"t{i}" for i in range(25)]
