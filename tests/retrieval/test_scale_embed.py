"""Rank-split embedding: 2 concurrent CPU processes (RANK/WORLD_SIZE as `accelerate launch`
sets them) write the same embedding shards as one process; each rank resumes on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modalign.retrieval.embed_shards import rank_device, read_embedding_shards

from helpers.embed import write_texts

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers.embed import HashModel
from modalign.retrieval.embed_shards import write_embedding_shards
r = write_embedding_shards(HashModel(), sys.argv[1], sys.argv[2], shard_rows=4, batch_size=3,
                           rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
print(r["written"], r["already_done"])
"""


def _launch(tmp: Path, manifest: Path, out: Path, world: int) -> list[tuple[int, int]]:
    script = tmp / "embed_rank.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parents[1])))
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(manifest), str(out)],
                                      env=env, stdout=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [tuple(int(v) for v in o.split()) for o in outs]


@pytest.mark.distributed
def test_two_ranks_equal_one_process_and_resume_per_rank(tmp_path: Path) -> None:
    manifest = write_texts(tmp_path / "m.jsonl", 30)
    assert _launch(tmp_path, manifest, tmp_path / "one", 1) == [(8, 0)]
    assert _launch(tmp_path, manifest, tmp_path / "two", 2) == [(4, 0), (4, 0)]
    one, _ = read_embedding_shards(tmp_path / "one")
    two, meta = read_embedding_shards(tmp_path / "two")
    assert meta["shards"] == 8
    assert two["text"].ids == one["text"].ids == [f"t{i}" for i in range(30)]
    np.testing.assert_array_equal(two["text"].vectors, one["text"].vectors)
    assert two["text"].values == one["text"].values
    # rank 1 lost a shard: the rerun redoes that one only, rank 0 has nothing to do
    for f in [tmp_path / "two" / "part-000006.done.json",
              *(tmp_path / "two" / "text").glob("part-000006.*")]:  # fmt: skip
        f.unlink()
    assert _launch(tmp_path, manifest, tmp_path / "two", 2) == [(0, 4), (1, 3)]
    again, _ = read_embedding_shards(tmp_path / "two")
    np.testing.assert_array_equal(again["text"].vectors, one["text"].vectors)


def test_rank_device_follows_local_rank() -> None:
    assert rank_device("cuda", 3) == "cuda:3"
    assert rank_device("cuda:1", 3) == "cuda:1"  # an explicit device is kept
    assert rank_device("cpu", 3) == "cpu"
