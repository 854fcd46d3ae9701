"""Sharded index build (``index build --embeddings DIR --shards N``): one trained quantizer, N
shard processes, merged into one on-disk IVF index that searches and serves exactly like the
unsharded build; its files verified on load; the build atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from modalign.cli import main
from modalign.core.errors import UserInputError
from modalign.retrieval import CorpusIndex, IndexBuildOptions, write_embedding_shards
from modalign.retrieval.index import IndexFileError, VectorIndex
from modalign.retrieval.index import sharded as sharded_mod
from modalign.retrieval.index.chunked import ShardVectors, build_chunked
from modalign.retrieval.index.from_shards import build_corpus_index_from_shards
from modalign.retrieval.index.sharded import build_sharded, shard_ranges

from helpers.embed import HashModel, write_texts
from helpers.serve import ThreadedServer

N, DIM = 20_000, 32


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> ShardVectors:
    """20k x 32 random vectors in 5 row-aligned ``.npy`` files (as embedding shards are)."""
    root = tmp_path_factory.mktemp("vectors")
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    for i in range(5):
        np.save(root / f"part-{i}.npy", x[i * 4000 : (i + 1) * 4000])
    return ShardVectors.open(sorted(root.glob("part-*.npy")))


IDS = [f"r{i}" for i in range(N)]
QUERIES = np.random.default_rng(1).standard_normal((300, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def sharded2(vectors: ShardVectors, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "ix"
    build_sharded(vectors, IDS, out, 2, IndexBuildOptions(factory="IVF64,Flat", seed=1))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(("shards", "factory"), [(2, "IVF64,Flat"), (3, "IVF64,PQ4np")])
def test_sharded_equals_single_index_with_the_same_quantizer(
    vectors: ShardVectors, sharded2: Path, tmp_path: Path, shards: int, factory: str
) -> None:
    opts = IndexBuildOptions(factory=factory, seed=1)
    single = build_chunked(vectors, IDS, opts)
    if shards == 2 and factory == "IVF64,Flat":
        out = sharded2
    else:
        out = tmp_path / "ix"
        build_sharded(vectors, IDS, out, shards, opts)
    merged = VectorIndex.load(out)  # what search / serve open: the files verified, lists mapped
    assert merged.on_disk and merged.ids == single.ids
    # the quantizer was trained once, on the sample an unsharded build picks: the same centroids
    import faiss

    q_single = faiss.extract_index_ivf(single._index).quantizer
    q_merged = faiss.extract_index_ivf(merged._index).quantizer
    np.testing.assert_array_equal(q_single.reconstruct_n(0, 64), q_merged.reconstruct_n(0, 64))
    assert merged.stats.search_params == single.stats.search_params  # the same nprobe tuned
    a, b = single.search(QUERIES, 10), merged.search(QUERIES, 10)
    assert a.ids == b.ids  # ids ...
    np.testing.assert_array_equal(a.scores, b.scores)  # ... and distances, bit for bit
    mapped = VectorIndex.load(out, mmap=True).search(QUERIES, 10)  # serve --mmap opens it so
    assert mapped.ids == a.ids
    np.testing.assert_array_equal(mapped.scores, a.scores)
    # the same at an nprobe the tuning did not pick (the lists themselves are equal)
    for ix in (single, merged):
        faiss.ParameterSpace().set_index_parameter(ix._index, "nprobe", 7)
    a, b = single.search(QUERIES, 25), merged.search(QUERIES, 25)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.scores, b.scores)
    rows = [s["rows"] for s in merged.stats.shards]
    assert len(rows) == shards and sum(rows) == N
    assert all(s["max_rss_bytes"] > 0 for s in merged.stats.shards)  # measured per process


def test_missing_or_corrupt_shard_data_is_refused_naming_the_file(
    sharded2: Path, tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(sharded2, tmp_path / "ix"))
    data = bad / "index.ivfdata"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the inverted lists
    data.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=r"index\.ivfdata is corrupt or truncated"):
        VectorIndex.load(bad)
    data.unlink()
    with pytest.raises(IndexFileError, match=r"index\.ivfdata is missing"):
        VectorIndex.load(bad)
    meta = json.loads((bad / "index.json").read_text())
    meta["files"]["../index.ivfdata"] = meta["files"].pop("index.ivfdata")
    (bad / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="bad file name"):
        VectorIndex.load(bad)


def test_sharded_index_cannot_grow_or_be_resaved(sharded2: Path, tmp_path: Path) -> None:
    ix = VectorIndex.load(sharded2)
    with pytest.raises(UserInputError, match="cannot grow in place"):
        ix.add(QUERIES[:2], ["new-a", "new-b"])
    with pytest.raises(UserInputError, match="cannot save a sharded"):
        ix.save(tmp_path / "copy")


def test_shard_options_are_checked_before_any_work(vectors: ShardVectors, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="needs an IVF factory"):
        build_sharded(vectors, IDS, tmp_path / "a", 2, IndexBuildOptions(factory="HNSW16"))
    with pytest.raises(UserInputError, match="exceeds the 20000 vectors"):
        build_sharded(vectors, IDS, tmp_path / "b", N + 1)
    with pytest.raises(UserInputError, match="runs on CPU"):
        build_sharded(vectors, IDS, tmp_path / "c", 2, IndexBuildOptions(device="cuda"))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".shards-*"))
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]


def _text_embeddings(root: Path, n: int = 400) -> Path:
    src = write_texts(root / "texts.jsonl", n)
    write_embedding_shards(HashModel(), src, root / "emb", shard_rows=90)
    return root / "emb"


@pytest.mark.distributed
def test_failed_shard_process_leaves_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb = _text_embeddings(tmp_path)
    out = tmp_path / "index"
    opts = IndexBuildOptions(factory="IVF4,Flat")
    build_corpus_index_from_shards(emb, out, opts, shards=2)
    before = CorpusIndex.open(out).indexes["text"].ids
    dying = tmp_path / "dying_worker.py"
    dying.write_text("import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)\n")
    monkeypatch.setattr(sharded_mod, "WORKER", dying)
    with pytest.raises(RuntimeError, match=r"shard process 0 failed \(exit status 3\)"):
        build_corpus_index_from_shards(emb, out, opts, shards=2)
    assert CorpusIndex.open(out).indexes["text"].ids == before  # intact and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dying_worker.py", "emb", "index",
                                                           "texts.jsonl"]  # fmt: skip


def run_json(capfd: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    """``main(argv + --json)``: exit 0 and exactly one JSON line on file descriptor 1."""
    code = main([*argv, "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one line of JSON, got: {out!r}"
    return json.loads(lines[0])


@pytest.mark.distributed
def test_search_and_serve_a_sharded_corpus_index(
    tiny_bundle, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modalign.server import ServeSettings
    from modalign.server.app import create_app
    from modalign.server.searcher import Searcher

    emb = tmp_path / "emb"
    run_json(capfd, ["embed", "--model", str(tiny_bundle.model), "--data",
                     str(tiny_bundle.corpus), "--out", str(emb), "--shard-rows", "6"])  # fmt: skip
    build = ["index", "build", "--embeddings", str(emb), "--factory", "IVF2,Flat"]
    res = run_json(capfd, [*build, "--out", str(tmp_path / "sharded"), "--shards", "2"])
    assert [s["rows"] for s in res["modalities"]["image"]["shards"]] == [8, 8]
    run_json(capfd, [*build, "--out", str(tmp_path / "single")])
    query = ["--text", "the sound two", "-k", "6"]
    hits = {
        name: run_json(capfd, ["search", "--index", str(tmp_path / name), *query])["results"]
        for name in ("sharded", "single")
    }
    assert hits["sharded"] == hits["single"] and len(hits["sharded"]) == 6

    searcher = Searcher.open(tmp_path / "sharded")
    assert all(ix.on_disk for ix in searcher.index.indexes.values())
    with ThreadedServer(create_app(searcher, ServeSettings())) as srv:
        res = httpx.post(f"{srv.url}/search", json={"text": "the sound two", "k": 6}, timeout=30)
    assert res.status_code == 200, res.text
    served = [{k: v for k, v in h.items() if k in hits["single"][0]} for h in res.json()["results"]]
    assert served == hits["single"]

    import modalign

    def no_embedding(*args: object) -> None:
        raise AssertionError("embedded before refusing a sharded index")

    monkeypatch.setattr(modalign, "_index_embeddings", no_embedding)
    with pytest.raises(UserInputError, match="cannot grow in place"):
        modalign.add_to_index(
            tmp_path / "sharded", model=tiny_bundle.model, data=tiny_bundle.corpus
        )
    with pytest.raises(UserInputError, match="give --embeddings DIR"):
        modalign.build_index(tmp_path / "x", model=tiny_bundle.model, data=tiny_bundle.corpus,
                             shards=2)  # fmt: skip
