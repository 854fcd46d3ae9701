"""Tests for modalign.retrieval.index (FAISS wrapper: build, tune, search, atomic save/load)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.retrieval.index import (
    IndexBuildOptions,
    IndexFileError,
    IndexFingerprintError,
    VectorIndex,
    choose_factory,
)
from modalign.retrieval.index import store as index_store
from modalign.retrieval.index import tuning as index_tuning

DIM = 32


def clustered(n: int, seed: int = 0, clusters: int = 50, spread: float = 0.6) -> np.ndarray:
    """Unit vectors drawn around random unit centres, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def make_ids(n: int, start: int = 0) -> list[str]:
    return [f"item-{i}" for i in range(start, start + n)]


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_vs_exact(index: VectorIndex, x: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    truth = exact_topk(x, q, k)
    found = index.search(q, k).ids
    hits = [len({f"item-{j}" for j in t} & set(f)) for t, f in zip(truth, found)]
    return sum(hits) / (k * len(q))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """3000 corpus vectors and 100 held-out queries from the same clusters."""
    x = clustered(3100, seed=0)
    return x[:3000], x[3000:]


@pytest.fixture(scope="module")
def flat(data: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    return VectorIndex.build(
        data[0], make_ids(len(data[0])), IndexBuildOptions(factory="Flat"), fingerprint="fp-a"
    )


def test_flat_equals_brute_force(flat: VectorIndex, data) -> None:
    x, q = data
    res = flat.search(q, 7)
    scores = q @ x.T
    want_scores = -np.sort(-scores, axis=1)[:, :7]
    assert res.scores.shape == (100, 7) and res.scores.dtype == np.float32
    np.testing.assert_allclose(res.scores, want_scores, rtol=1e-5, atol=1e-5)
    truth = exact_topk(x, q, 7)
    # ids agree wherever the brute-force scores are not near-tied
    for row, (got, want) in enumerate(zip(res.ids, truth)):
        margins = np.abs(np.diff(scores[row, want]))
        if margins.min() > 1e-5:
            assert got == [f"item-{j}" for j in want]


@pytest.mark.parametrize("factory", ["HNSW16", "IVF32,Flat", "IVF32,SQ8"])
def test_approximate_indexes_are_tuned_to_target_recall(data, factory: str) -> None:
    x, q = data
    index = VectorIndex.build(
        x, make_ids(len(x)), IndexBuildOptions(factory=factory, target_recall=0.95)
    )
    stats = index.stats
    (knob,) = stats.search_params
    assert knob == ("efSearch" if factory.startswith("HNSW") else "nprobe")
    assert stats.measured_recall >= 0.95
    # held-out queries (not corpus points) see a similar recall
    assert recall_vs_exact(index, x, q) >= 0.9


def test_tuning_picks_smallest_setting_reaching_target(data) -> None:
    x, _ = data
    loose = VectorIndex.build(
        x, make_ids(len(x)), IndexBuildOptions(factory="IVF64,Flat", target_recall=0.5)
    )
    strict = VectorIndex.build(
        x, make_ids(len(x)), IndexBuildOptions(factory="IVF64,Flat", target_recall=0.99)
    )
    assert loose.stats.search_params["nprobe"] < strict.stats.search_params["nprobe"]
    assert strict.stats.measured_recall >= 0.99


def test_smallest_reaching_finds_threshold() -> None:
    calls: list[int] = []

    def recall(v: int) -> float:
        calls.append(v)
        return min(1.0, v / 37)

    value, measured = index_tuning.smallest_reaching(recall, 1, 1024, 0.95)
    assert value == 36 and measured >= 0.95  # 36/37 >= 0.95 > 35/37
    assert len(calls) < 15
    # unreachable target: smallest value near the best recall seen
    value, measured = index_tuning.smallest_reaching(lambda v: min(0.6, v / 10), 1, 64, 0.95)
    assert (value, measured) == (8, 0.6) or measured >= 0.595


def test_auto_selection() -> None:
    assert choose_factory(1_000, 384) == "Flat"
    assert VectorIndex.build(clustered(500), make_ids(500)).factory == "Flat"
    assert choose_factory(200_000, 384) == "HNSW32"
    big = choose_factory(5_000_000, 384)
    assert big.startswith("IVF") and big.endswith(",Flat")
    assert choose_factory(200_000, 384, device="cuda").startswith("IVF")
    # memory-tight: compressed codes that fit the budget
    tight = choose_factory(5_000_000, 384, memory_budget_bytes=5_000_000 * 60)
    assert tight.startswith("IVF") and ",PQ" in tight
    m = int(tight.rsplit("PQ", 1)[1].removesuffix("np"))
    assert 384 % m == 0 and m + 8 <= 60
    assert choose_factory(5_000_000, 384, memory_budget_bytes=5_000_000 * 500).endswith("SQ8")
    with pytest.raises(UserInputError, match="too small"):
        choose_factory(5_000_000, 384, memory_budget_bytes=1000)


def test_auto_builds_what_it_chose_and_fits_budget() -> None:
    x = clustered(6000, seed=3)
    budget = 6000 * 6 + 1024 * DIM  # codes + PQ codebooks; SQ8 / SQ4 need 32 / 16 B/vector
    index = VectorIndex.build(x, make_ids(6000), IndexBuildOptions(memory_budget_bytes=budget))
    assert index.factory == "PQ4np"
    assert faiss.serialize_index(index._cpu_index()).nbytes <= budget


def test_add_then_search_finds_new_items(data) -> None:
    x, _ = data
    index = VectorIndex.build(x, make_ids(len(x)), IndexBuildOptions(factory="IVF32,Flat"))
    new = clustered(20, seed=9)
    index.add(new, make_ids(20, start=10_000))
    assert len(index) == len(x) + 20
    res = index.search(new, 1)
    assert [r[0] for r in res.ids] == make_ids(20, start=10_000)
    with pytest.raises(UserInputError, match="already in the index"):
        index.add(new[:1], ["item-0"])


def test_list_assignments_need_an_ivf_index(flat: VectorIndex) -> None:
    x = clustered(2, seed=3)
    with pytest.raises(UserInputError, match="need a CPU IVF index, not 'Flat'"):
        flat.add_assigned(x, make_ids(2, start=50_000), np.zeros(2, dtype=np.int64))
    assert len(flat) == 3000  # nothing added


def test_k_larger_than_count_is_clipped() -> None:
    x = clustered(5)
    index = VectorIndex.build(x, make_ids(5))
    res = index.search(x[:2], 50)
    assert res.scores.shape == (2, 5)
    assert all(sorted(r) == sorted(make_ids(5)) for r in res.ids)


def test_save_load_round_trip(tmp_path: Path, data) -> None:
    x, q = data
    index = VectorIndex.build(
        x, make_ids(len(x)), IndexBuildOptions(factory="HNSW16"), fingerprint="fp-a"
    )
    index.save(tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {
        "index.faiss",
        "ids.txt",
        "index.json",
    }
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (meta["factory"], meta["metric"], meta["dim"], meta["count"]) == (
        "HNSW16",
        "ip",
        32,
        3000,
    )
    assert meta["search_params"] == index.stats.search_params
    assert meta["build"]["measured_recall"] == index.stats.measured_recall
    loaded = VectorIndex.load(tmp_path / "idx", expected_fingerprint="fp-a")
    assert loaded.stats == index.stats and loaded.fingerprint == "fp-a"
    before, after = index.search(q, 10), loaded.search(q, 10)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert before.ids == after.ids
    # saving again over an existing index replaces it and leaves no temp dirs
    loaded.add(clustered(3, seed=5), ["a", "b", "c"])
    loaded.save(tmp_path / "idx")
    assert len(VectorIndex.load(tmp_path / "idx")) == 3003
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_l2_metric_scores_are_negative_distances() -> None:
    x = clustered(50)
    index = VectorIndex.build(x, make_ids(50), IndexBuildOptions(factory="Flat", metric="l2"))
    res = index.search(x[:3], 2)
    assert res.ids[0][0] == "item-0"
    np.testing.assert_allclose(res.scores[:, 0], 0.0, atol=1e-5)
    assert (res.scores[:, 1] < 0).all()


def test_corrupt_index_file_raises_user_error(tmp_path: Path, flat: VectorIndex) -> None:
    flat.save(tmp_path / "idx")
    path = tmp_path / "idx" / "index.faiss"
    blob = bytearray(path.read_bytes())
    blob[100:110] = b"\xff" * 10
    path.write_bytes(bytes(blob))
    with pytest.raises(IndexFileError, match=r"index\.faiss is corrupt.*rebuild"):
        VectorIndex.load(tmp_path / "idx")


def test_unreadable_index_raises_user_error_not_crash(tmp_path: Path, flat: VectorIndex) -> None:
    flat.save(tmp_path / "idx")
    path = tmp_path / "idx" / "index.faiss"
    path.write_bytes(b"garbage" * 10)
    # make the checksums agree so FAISS itself is asked to parse the garbage
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["index.faiss"] = index_store.file_digest(path)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="cannot be read by FAISS"):
        VectorIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("victim", ["index.json", "ids.txt", "index.faiss"])
def test_missing_or_truncated_files(tmp_path: Path, flat: VectorIndex, victim: str) -> None:
    flat.save(tmp_path / "idx")
    (tmp_path / "idx" / victim).unlink()
    with pytest.raises(IndexFileError, match=victim.replace(".", r"\.")):
        VectorIndex.load(tmp_path / "idx")
    flat.save(tmp_path / "idx2")
    (tmp_path / "idx2" / victim).write_bytes(b"{")
    with pytest.raises(IndexFileError, match=victim.replace(".", r"\.")):
        VectorIndex.load(tmp_path / "idx2")
    with pytest.raises(IndexFileError, match="does not exist"):
        VectorIndex.load(tmp_path / "nowhere")


def test_fingerprint_mismatch(tmp_path: Path, flat: VectorIndex) -> None:
    flat.save(tmp_path / "idx")
    with pytest.raises(IndexFingerprintError, match="built by another model"):
        VectorIndex.load(tmp_path / "idx", expected_fingerprint="fp-b")
    assert isinstance(IndexFingerprintError("x"), UserInputError)
    assert VectorIndex.load(tmp_path / "idx").fingerprint == "fp-a"


def test_wrong_dimension_and_empty_queries(flat: VectorIndex) -> None:
    with pytest.raises(UserInputError, match="dimension 16 but the index expects dimension 32"):
        flat.search(np.zeros((2, 16), np.float32), 5)
    with pytest.raises(UserInputError, match="empty"):
        flat.search(np.zeros((0, DIM), np.float32), 5)
    with pytest.raises(UserInputError, match="k must be"):
        flat.search(np.zeros((1, DIM), np.float32), 0)
    with pytest.raises(UserInputError, match="dimension 8"):
        flat.add(np.zeros((1, 8), np.float32), ["z"])
    assert len(flat.search(np.ones(DIM, np.float32), 3).ids) == 1  # one 1-D query is fine


def test_bad_build_arguments() -> None:
    x = clustered(10)
    with pytest.raises(UserInputError, match="invalid FAISS factory"):
        VectorIndex.build(x, make_ids(10), IndexBuildOptions(factory="NotAnIndex7"))
    with pytest.raises(UserInputError, match="metric"):
        VectorIndex.build(x, make_ids(10), IndexBuildOptions(metric="cosine"))
    with pytest.raises(UserInputError, match="unique"):
        VectorIndex.build(x, ["a"] * 10)
    with pytest.raises(UserInputError, match="10 vectors but 9 ids"):
        VectorIndex.build(x, make_ids(9))
    with pytest.raises(UserInputError, match="single-line"):
        VectorIndex.build(x[:1], ["a\nb"])


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(UserInputError, match="no GPU"):
        VectorIndex.build(clustered(10), make_ids(10), IndexBuildOptions(device="cuda"))


def test_crash_mid_save_keeps_old_index(tmp_path: Path, flat: VectorIndex, monkeypatch) -> None:
    flat.save(tmp_path / "idx")
    bigger = VectorIndex.build(clustered(40, seed=4), make_ids(40), fingerprint="fp-new")

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_store, "_write_bytes", crash)  # dies after index.faiss is written
    with pytest.raises(OSError, match="disk full"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    old = VectorIndex.load(tmp_path / "idx", expected_fingerprint="fp-a")
    assert len(old) == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # temp dir cleaned up


def test_crash_between_renames_falls_back_to_previous(
    tmp_path: Path, flat: VectorIndex, monkeypatch
) -> None:
    flat.save(tmp_path / "idx")
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:  # old index moved aside, new one not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_die)
    new = VectorIndex.build(clustered(40, seed=4), make_ids(40), fingerprint="fp-new")
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    assert not (tmp_path / "idx").exists()
    assert len(VectorIndex.load(tmp_path / "idx", expected_fingerprint="fp-a")) == 3000
    new.save(tmp_path / "idx")  # the next save completes and clears the backup
    assert len(VectorIndex.load(tmp_path / "idx")) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_refuses_to_overwrite_non_index_directory(tmp_path: Path, flat: VectorIndex) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        flat.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_build_options_ef_construction_and_tuning_queries(data) -> None:
    x, q = data
    index = VectorIndex.build(
        x,
        make_ids(len(x)),
        IndexBuildOptions(factory="HNSW16", ef_construction=8),
        tuning_queries=q,
    )
    assert faiss.downcast_index(index._index).hnsw.efConstruction == 8
    assert index.stats.tune_queries == len(q)
    assert index.stats.measured_recall >= 0.95
    assert recall_vs_exact(index, x, q) == pytest.approx(index.stats.measured_recall, abs=0.01)
    with pytest.raises(UserInputError, match="ef_construction applies to HNSW"):
        VectorIndex.build(x, make_ids(len(x)), IndexBuildOptions(factory="Flat", ef_construction=8))
    with pytest.raises(UserInputError, match="tuning_queries have dimension 8"):
        VectorIndex.build(
            x, make_ids(len(x)), IndexBuildOptions(factory="HNSW16"), tuning_queries=q[:, :8]
        )


def test_tuning_queries_are_held_out(data, flat: VectorIndex) -> None:
    x, _ = data
    queries, truth, rows = index_tuning.tuning_set(x, "ip", 0, None)
    assert truth.shape == (1000, 10) and (truth >= 0).all()
    np.testing.assert_array_equal(queries, x[rows])
    # leave-one-out: a query's own corpus row is never among its neighbours
    assert not (truth == rows[:, None]).any()
    assert index_tuning.recall_at_k(flat._index, queries, truth, rows) == 1.0


def test_too_few_training_points_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="cannot train 'IVF64,Flat' on 20 vectors"):
        VectorIndex.build(clustered(20), make_ids(20), IndexBuildOptions(factory="IVF64,Flat"))


def test_build_options_are_one_checked_type() -> None:
    """Issue 22: every builder takes one IndexBuildOptions, checked when it is made."""
    from dataclasses import FrozenInstanceError

    import modalign.retrieval as surface

    assert surface.IndexBuildOptions is IndexBuildOptions
    with pytest.raises(UserInputError, match="metric must be one of"):
        IndexBuildOptions(metric="cosine")
    with pytest.raises(UserInputError, match=r"target_recall must be in \(0, 1\]"):
        IndexBuildOptions(target_recall=1.5)
    with pytest.raises(UserInputError, match="device must be"):
        IndexBuildOptions(device="gpu")
    opts = IndexBuildOptions(factory="IVF32,Flat", seed=7)
    with pytest.raises(FrozenInstanceError):
        opts.seed = 8  # type: ignore[misc]
    assert opts.factory_for(10**6, 384) == "IVF32,Flat"
    assert IndexBuildOptions().factory_for(500, 16) == choose_factory(500, 16)
    assert IndexBuildOptions(memory_budget_bytes=10**6 * 60).factory_for(10**6, 384) == (
        choose_factory(10**6, 384, memory_budget_bytes=10**6 * 60)
    )
