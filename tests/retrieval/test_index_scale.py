"""Corpus-scale indexes: chunked from-disk build == in-RAM build; mmap loads search the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faiss import serialize_index

from modalign.retrieval import IndexBuildOptions
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index import VectorIndex
from modalign.retrieval.index.chunked import ShardVectors, build_chunked, exact_topk
from modalign.retrieval.index.corpus import CorpusIndex, build_corpus_index
from modalign.retrieval.index.from_shards import build_corpus_index_from_shards
from modalign.retrieval.index.tuning import recall_at_k


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _files(x: np.ndarray, root: Path, sizes: list[int]) -> ShardVectors:
    root.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for i, s in enumerate(sizes):
        np.save(root / f"part-{i:06d}.npy", x[start : start + s])
        files.append(root / f"part-{i:06d}.npy")
        start += s
    return ShardVectors.open(files)


def _recall(ix: VectorIndex, q: np.ndarray, x: np.ndarray) -> float:
    from faiss import knn

    _, exact = knn(q, x, 10)
    found = [set(r) for r in ix.search(q, 10).ids]
    ids = ix.ids
    return float(np.mean([len(f & {ids[j] for j in e}) / 10 for f, e in zip(found, exact)]))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "Flat"])
def test_chunked_build_equals_in_ram_build(tmp_path: Path, factory: str) -> None:
    x = _clustered(6000, 32, seed=1)
    q = _clustered(200, 32, seed=2)
    ids = [f"i{j}" for j in range(len(x))]
    ram = VectorIndex.build(x, ids, IndexBuildOptions(factory=factory, seed=3))
    vec = _files(x, tmp_path / "v", [1000, 2500, 7, 2493])
    assert (vec.n, vec.dim) == x.shape
    chunked = build_chunked(vec, ids, IndexBuildOptions(factory=factory, seed=3))
    assert chunked.ids == ram.ids
    assert chunked.stats.search_params == ram.stats.search_params
    assert chunked.stats.train_size == ram.stats.train_size
    assert abs(_recall(chunked, q, x) - _recall(ram, q, x)) <= 0.005
    a, b = ram.search(q, 10), chunked.search(q, 10)
    same = np.mean([ra == rb for ra, rb in zip(a.ids, b.ids)])
    assert same >= 0.99  # identical quantiser and lists: the same results
    # IVF: lists sized up front and filled with precomputed assignments, yet byte-identical
    assert np.array_equal(serialize_index(chunked._cpu_index()), serialize_index(ram._cpu_index()))


def test_exact_topk_merges_files_like_one_search(tmp_path: Path) -> None:
    from faiss import knn

    x, q = _clustered(3000, 16, seed=4), _clustered(50, 16, seed=5)
    vec = _files(x, tmp_path / "v", [5, 1200, 1795])
    _, want = knn(q, x, 11)
    got = exact_topk(q, vec, 11, "ip")
    assert (got == want).mean() > 0.99  # ties may swap, nothing else
    assert vec.take(np.array([0, 4, 5, 2999])).tolist() == x[[0, 4, 5, 2999]].tolist()
    idx = VectorIndex.build(x, [str(i) for i in range(3000)], IndexBuildOptions(factory="Flat"))
    assert recall_at_k(idx._index, q, got[:, :10], np.full(50, -1)) == pytest.approx(1.0)


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,PQ8np", "Flat", "HNSW16"])
def test_mmap_load_searches_identically(tmp_path: Path, factory: str) -> None:
    x, q = _clustered(3000, 32, seed=6), _clustered(40, 32, seed=7)
    built = VectorIndex.build(x, [f"i{j}" for j in range(3000)], IndexBuildOptions(factory=factory))
    built.save(tmp_path / "ix")
    plain = VectorIndex.load(tmp_path / "ix")
    mapped = VectorIndex.load(tmp_path / "ix", mmap=True)
    a, b = plain.search(q, 10), mapped.search(q, 10)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.scores, b.scores)
    assert mapped.stats.search_params == plain.stats.search_params


def _embed_dir(root: Path, x: np.ndarray, rows: int) -> Path:
    """A ``modalign embed`` output written by hand (text modality, ``rows`` per shard)."""
    from modalign.core.artifact import atomic_files, write_meta
    from modalign.retrieval.embed_shards import FORMAT, FORMAT_VERSION, META

    n_shards = (len(x) + rows - 1) // rows
    write_meta(root / META, FORMAT, FORMAT_VERSION, {
        "key": {}, "dim": x.shape[1], "modalities": ["text"], "shard_rows": rows,
        "shards": n_shards, "fingerprint": "fp-1", "model": "m",
    })  # fmt: skip
    for s in range(n_shards):
        part = x[s * rows : (s + 1) * rows]
        ids = [f"t{s * rows + j}" for j in range(len(part))]
        with atomic_files(root / "text", f"part-{s:06d}.json") as (tmp, meta):
            np.save(tmp / f"part-{s:06d}.npy", part)
            meta.update({"rows": len(ids), "ids": ids, "labels": [None] * len(ids),
                         "values": [f"caption {i}" for i in ids]})  # fmt: skip
    return root


def test_corpus_index_from_shards_equals_in_ram_corpus_index(tmp_path: Path) -> None:
    x, q = _clustered(4000, 32, seed=8), _clustered(30, 32, seed=9)
    emb_dir = _embed_dir(tmp_path / "emb", x, rows=900)
    stats, fp = build_corpus_index_from_shards(
        emb_dir, tmp_path / "disk", IndexBuildOptions(factory="IVF32,SQ8")
    )
    assert fp == "fp-1" and stats["text"]["items"] == 4000
    ids = [f"t{j}" for j in range(4000)]
    emb = {"text": Embeddings("text", ids, x, [None] * 4000, [f"caption {i}" for i in ids])}
    build_corpus_index(emb, tmp_path / "ram", "fp-1", "m", IndexBuildOptions(factory="IVF32,SQ8"))
    disk = CorpusIndex.open(tmp_path / "disk", mmap=True)
    ram = CorpusIndex.open(tmp_path / "ram")
    assert disk.indexes["text"].ids == ram.indexes["text"].ids
    assert disk.items == ram.items
    a, b = disk.search(q, 10), ram.search(q, 10)
    assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b]
    meta = json.loads((tmp_path / "disk" / "index.json").read_text())
    assert meta["modalities"] == ["text"] and meta["fingerprint"] == "fp-1"


def test_cli_index_build_from_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from modalign.cli import main

    x = _clustered(1500, 16, seed=10)
    emb_dir = _embed_dir(tmp_path / "emb", x, rows=400)
    code = main(["index", "build", "--embeddings", str(emb_dir), "--out", str(tmp_path / "ix"),
                 "--factory", "IVF16,Flat", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fingerprint"] == "fp-1" and out["modalities"]["text"]["items"] == 1500
    index = CorpusIndex.open(tmp_path / "ix", mmap=True)
    hits = index.search(x[:3], 1)
    assert [h[0].id for h in hits] == ["t0", "t1", "t2"]
    assert hits[0][0].value == "caption t0"
