"""The memory-budget tier of ``factory="auto"``: it fits its byte budget and keeps recall."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from modalign.retrieval import IndexBuildOptions
from modalign.retrieval.index import VectorIndex, choose_factory
from modalign.retrieval.index import tuning as index_tuning

DIM = 64
N = 52_000  # just above FLAT_MAX_N, so auto picks an IVF index
BUDGET = int(0.3 * 4 * N * DIM)  # 0.3 of the raw float32 vectors, the issue-14 tier


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    x = _clustered(N + 500, seed=21)
    corpus, queries = x[:N], x[N:]
    index = VectorIndex.build(
        corpus,
        [str(i) for i in range(N)],
        IndexBuildOptions(memory_budget_bytes=BUDGET, target_recall=0.95),
    )
    return index, corpus, queries


def test_budget_choice_fits_its_budget(built) -> None:
    index, _, _ = built
    assert index.factory == choose_factory(N, DIM, BUDGET)
    # the most accurate code that fits: 8-bit scalar codes behind an IVF quantiser
    assert index.factory.startswith("IVF") and index.factory.endswith(",SQ8")
    assert faiss.serialize_index(index._cpu_index()).nbytes <= BUDGET


def test_budget_choice_keeps_recall_on_held_out_queries(built) -> None:
    index, corpus, queries = built
    stats = index.stats
    # tuning keeps the lower 95% confidence bound of the tuning recall at the target
    assert stats.recall_lower_bound >= 0.95
    assert stats.measured_recall > stats.recall_lower_bound
    _, exact = faiss.knn(queries, corpus, 10, metric=faiss.METRIC_INNER_PRODUCT)
    found = index.search(queries, 10).ids
    held_out = np.mean([len({str(j) for j in e} & set(f)) / 10 for e, f in zip(exact, found)])
    # 500 fresh queries: their own sampling error is ~0.005 around the true recall
    assert held_out >= 0.945


def test_lower_bound_is_below_the_mean_by_the_standard_error() -> None:
    per_query = np.array([1.0] * 90 + [0.5] * 10)
    stderr = per_query.std(ddof=1) / np.sqrt(len(per_query))
    bound = index_tuning.lower_bound(per_query)
    assert bound == pytest.approx(per_query.mean() - index_tuning.CONFIDENCE_Z * stderr)
    assert index_tuning.lower_bound(np.ones(50)) == 1.0


def test_tuning_needs_the_bound_not_just_the_mean_to_reach_the_target() -> None:
    x = _clustered(6000, seed=22)
    index = VectorIndex.build(
        x,
        [str(i) for i in range(len(x))],
        IndexBuildOptions(factory="IVF64,Flat", target_recall=0.99),
    )
    nprobe = index.stats.search_params["nprobe"]
    assert nprobe > 1 and index.stats.recall_lower_bound >= 0.99
    # one step less would not have had its lower bound at the target
    tset = index_tuning.tuning_set(x, "ip", 0, None)
    index_tuning.apply_params(index._index, {"nprobe": nprobe - 1}, on_gpu=False)
    below = index_tuning.query_recalls(index._index, *tset)
    assert index_tuning.lower_bound(below) < 0.99
