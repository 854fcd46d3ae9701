"""Recall tuning: the smallest search-time knob (``nprobe`` / ``efSearch``) reaching a target.

Any index with a search-time knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is tuned after it
is built: the smallest (hence fastest) value whose recall@10 against exact search reaches
``target_recall`` on held-out queries is kept and saved with the index.

"Reaches" means the one-sided 95% lower confidence bound of the mean recall over the tuning
queries (mean - 1.645 standard errors) is at or above the target, so the recall on fresh
queries from the same distribution meets the target, not just the recall on the 1000 queries
that happened to be drawn for tuning (the mean alone would land just above the target and miss
it on new queries about half of the time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from modalign.retrieval.index.factory import METRICS

__all__ = [
    "TuneOutcome",
    "apply_params",
    "lower_bound",
    "query_recalls",
    "tunable_param",
    "tune",
    "tune_on",
]

log = logging.getLogger(__name__)

TUNE_K = 10
TUNE_QUERIES = 1000
# one-sided 95% normal quantile: tuning keeps mean recall - CONFIDENCE_Z * stderr >= target
CONFIDENCE_Z = 1.645
# faiss GPU kernels support k (and IVF nprobe) up to 2048.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class TuneOutcome:
    """The chosen knob value, the mean recall it measured and that mean's lower 95% bound."""

    params: dict[str, int]
    measured_recall: float
    queries: int
    recall_lower_bound: float


def tunable_param(index: faiss.Index) -> tuple[str, int] | None:
    """(name, max value) of the search-time knob of a CPU index, or None."""
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    if "nprobe" in names:
        return "nprobe", int(faiss.extract_index_ivf(index).nlist)
    if "efSearch" in names:
        return "efSearch", 1024
    return None


def _start_value(name: str) -> int:
    # efSearch below k makes HNSW return fewer than k results
    return TUNE_K if name == "efSearch" else 1


def apply_params(index: faiss.Index, params: dict[str, int], on_gpu: bool) -> None:
    """Set search-time parameters (``{"nprobe": 8}``) on a CPU or GPU index."""
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def tune(
    index: faiss.Index,
    x: np.ndarray,
    knob: tuple[str, int],
    metric: str,
    target_recall: float,
    seed: int,
    tuning_queries: np.ndarray | None,
    on_gpu: bool,
    what: str = "index",
) -> TuneOutcome:
    """Pick the smallest ``knob`` value reaching ``target_recall`` recall@10; leave it set."""
    tset = tuning_set(x, metric, seed, tuning_queries)
    return tune_on(index, tset, knob, target_recall, on_gpu, what)


def tune_on(
    index: faiss.Index,
    tset: tuple[np.ndarray, np.ndarray, np.ndarray],
    knob: tuple[str, int],
    target_recall: float,
    on_gpu: bool,
    what: str = "index",
) -> TuneOutcome:
    """:func:`tune` on a prepared ``(queries, exact top-k, own rows)`` tuning set."""
    name, max_value = knob
    if on_gpu:
        max_value = min(max_value, GPU_MAX_K)  # GPU IVF kernels cap nprobe like k
    queries, truth, self_rows = tset
    means: dict[int, float] = {}

    def bound(value: int) -> float:
        apply_params(index, {name: value}, on_gpu)
        per_query = query_recalls(index, queries, truth, self_rows)
        means[value] = float(per_query.mean()) if len(per_query) else 1.0
        return lower_bound(per_query)

    value, low = smallest_reaching(bound, _start_value(name), max_value, target_recall)
    apply_params(index, {name: value}, on_gpu)
    if low < target_recall:
        log.warning(
            "%s reaches recall@10 %.3f (95%% lower bound %.3f) < target %.3f at %s=%d "
            "(compression limits recall)",
            what, means[value], low, target_recall, name, value,
        )  # fmt: skip
    return TuneOutcome({name: value}, round(means[value], 4), len(queries), round(low, 4))


def lower_bound(per_query: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean of per-query recalls."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 1.0
    stderr = float(per_query.std(ddof=1)) / math.sqrt(len(per_query))
    return float(per_query.mean()) - CONFIDENCE_Z * stderr


def tuning_set(
    x: np.ndarray, metric: str, seed: int, queries: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tuning queries, their exact top-k, and the corpus row each query must not count.

    Without user queries this is leave-one-out: sampled corpus vectors are the queries and
    each one's own row is dropped from both exact and approximate results, so every query
    behaves like a fresh held-out sample from the corpus distribution. Perturbing corpus
    points instead would overstate recall (their neighbourhood is the source's neighbourhood).
    """
    if queries is None:
        rows = tuning_rows(len(x), seed)
        queries = x[rows]
    else:
        rows = np.full(len(queries), -1, dtype=np.int64)
    k = min(TUNE_K, len(x) - int(rows[0] >= 0))
    _, truth = faiss.knn(queries, x, k + 1, metric=METRICS[metric])
    return queries, drop_rows(truth, rows, k), rows


def tuning_rows(n: int, seed: int) -> np.ndarray:
    """Sorted corpus rows used as leave-one-out tuning queries (the same for any storage)."""
    return np.sort(
        np.random.default_rng(seed + 1).choice(n, size=min(TUNE_QUERIES, n), replace=False)
    )


def drop_rows(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Per query, remove its own source row from ``labels`` and keep the first k."""
    out = np.full((len(labels), k), -1, dtype=np.int64)
    for i, (row, own) in enumerate(zip(labels, rows)):
        kept = row[row != own][:k]
        out[i, : len(kept)] = kept
    return out


def recall_at_k(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, rows: np.ndarray
) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits, valid = _hits(index, queries, truth, rows)
    return float(hits.sum() / max(1, valid.sum()))


def query_recalls(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Per query with any exact neighbour, the fraction of them found in the approximate top-k."""
    hits, valid = _hits(index, queries, truth, rows)
    counts = valid.sum(axis=1)
    keep = counts > 0
    return hits.sum(axis=1)[keep] / counts[keep]


def _hits(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, k)`` masks: exact neighbour found, and exact neighbour exists."""
    k = truth.shape[1]
    _, found = index.search(queries, k + 1)
    found = drop_rows(found, rows, k)
    valid = truth >= 0
    return (found[:, :, None] == truth[:, None, :]).any(axis=1) & valid, valid


def smallest_reaching(
    recall: Callable[[int], float], low: int, high: int, target: float
) -> tuple[int, float]:
    """Smallest value in [low, high] with recall(value) >= target (recall assumed monotone).

    Doubles from ``low`` then bisects. If the target is out of reach, returns the smallest
    value within 0.005 of the best recall seen, since larger values only cost speed.
    """
    seen: dict[int, float] = {}
    value = low
    while True:
        seen[value] = recall(value)
        if seen[value] >= target or value >= high:
            break
        value = min(2 * value, high)
    if seen[value] < target:
        best = max(seen.values())
        value = min(v for v, r in seen.items() if r >= best - 0.005)
        return value, seen[value]
    lo = max((v for v in seen if v < value), default=low - 1)
    while value - lo > 1:
        mid = (lo + value) // 2
        seen[mid] = recall(mid)
        if seen[mid] >= target:
            value = mid
        else:
            lo = mid
    return value, seen[value]
