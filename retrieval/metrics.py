"""Retrieval evaluation on embeddings (recall@k, mAP, ranks), memory bounded.

Scores are inner products, so callers pass L2-normalised embeddings to get cosine similarity.
A gallery item is a *positive* for a query iff their groups are equal; choose the groups to
express the task:

* class-level retrieval: group = class label;
* instance-level retrieval: group = item id;
* several captions per image: group = image id of each caption / image.

Ties are broken deterministically and pessimistically: among gallery items with the same score,
every negative ranks ahead of every positive. A degenerate model (e.g. a constant embedding) thus
gets the worst possible ranks, never a lucky draw from sort order.

Queries are processed in chunks of ``chunk_size`` rows, so peak memory is about
``chunk_size * N`` scores plus the ``N * D`` gallery, never the full ``Q * N`` score matrix.
The chunk size does not change the metrics, except that float32 BLAS may round a score
differently in its last bit for another matrix shape, which matters only for near-exact ties.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from modalign.core.errors import UserInputError

__all__ = [
    "NoPositivesError",
    "QueryRanks",
    "RetrievalMetrics",
    "query_ranks",
    "retrieval_metrics",
    "validate_ks",
]

# Rows of one group are ranked in blocks so the (rows, positives) temporaries stay a few tens
# of MB even when one group holds most of the gallery.
_BLOCK_ELEMS = 1 << 22


class NoPositivesError(UserInputError):
    """No query has a positive in the gallery, so no metric can be computed."""


@dataclass
class RetrievalMetrics:
    """Retrieval quality of one query set against one gallery.

    Attributes:
        recall: ``{k: fraction of queries with at least one positive in the top k}``.
        precision_at_1: fraction of queries whose top-1 item is a positive (= recall@1).
        map: mean over queries of average precision over the full ranking of the gallery.
        median_rank: median 1-based rank of the first positive.
        mean_rank: mean 1-based rank of the first positive.
        queries: number of queries evaluated.
        skipped: number of queries skipped because they have no positive in the gallery.
    """

    recall: dict[int, float]
    precision_at_1: float
    map: float
    median_rank: float
    mean_rank: float
    queries: int
    skipped: int = 0

    def to_dict(self) -> dict[str, float | int]:
        """Flat JSON-ready dict: ``recall@K`` per k, ``map``, ranks and ``queries``."""
        out: dict[str, float | int] = {f"recall@{k}": v for k, v in sorted(self.recall.items())}
        out["map"] = self.map
        out["median_rank"] = self.median_rank
        out["mean_rank"] = self.mean_rank
        out["queries"] = self.queries
        return out


@dataclass
class QueryRanks:
    """Per-query results, in query order, for the queries that have a positive.

    Attributes:
        rows: ``(q,)`` index of each scored query in the query array.
        first_rank: ``(q,)`` 1-based rank of its first positive (pessimistic on ties).
        ap: ``(q,)`` its average precision over the full ranking.
        skipped: queries without any positive in the gallery.
    """

    rows: np.ndarray
    first_rank: np.ndarray
    ap: np.ndarray
    skipped: int

    def recall_at(self, k: int) -> np.ndarray:
        """``(q,)`` 0/1: whether each query has a positive in its top ``k``."""
        return (self.first_rank <= k).astype(np.float64)

    def metrics(self, ks: Sequence[int] = (1, 5, 10)) -> RetrievalMetrics:
        """The averages :func:`retrieval_metrics` reports (``NoPositivesError`` when no query
        has a positive)."""
        return _summarise(self, validate_ks(ks))


def retrieval_metrics(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_groups: np.ndarray,
    gallery_groups: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    exclude: np.ndarray | None = None,
) -> RetrievalMetrics:
    """Rank the gallery for every query by inner product and score the rankings.

    Args:
        queries: ``(Q, D)`` query embeddings (L2-normalised by the caller for cosine).
        gallery: ``(N, D)`` gallery embeddings.
        query_groups: ``(Q,)`` int group of each query.
        gallery_groups: ``(N,)`` int group of each gallery item; equal groups = positive.
        ks: cut-offs for recall@k.
        chunk_size: queries scored at once; peak memory is about ``chunk_size * N * 4`` bytes.
        exclude: optional ``(Q,)`` gallery index to drop from each query's ranking (``-1`` =
            none), e.g. the query itself in same-modality retrieval.

    Returns:
        :class:`RetrievalMetrics`. Queries without any positive are skipped and counted.

    Raises:
        UserInputError: on bad shapes, non-finite values or bad arguments.
        NoPositivesError: when no query has a positive.
    """
    ks = validate_ks(ks)
    return query_ranks(queries, gallery, query_groups, gallery_groups, chunk_size, exclude).metrics(
        ks
    )


def query_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_groups: np.ndarray,
    gallery_groups: np.ndarray,
    chunk_size: int = 1024,
    exclude: np.ndarray | None = None,
) -> QueryRanks:
    """Per-query first-positive rank and AP (what :func:`retrieval_metrics` averages).

    Same arguments, ranking and tie rule as :func:`retrieval_metrics`; per-query figures feed
    bootstrap intervals without re-ranking query by query. Raises ``UserInputError`` on bad
    input (it does not raise :class:`NoPositivesError`: ``skipped`` counts those queries).
    """
    q, g, qg, gg, ex = _validate(queries, gallery, query_groups, gallery_groups, exclude)
    if chunk_size < 1:
        raise UserInputError(f"chunk_size must be >= 1, got {chunk_size}")
    positives = _group_index(gg)
    parts = [
        _score_chunk(q[s:e], g, qg[s:e], ex[s:e], positives, s)
        for s, e in _chunks(len(q), chunk_size)
    ]
    rows = _cat([p.rows for p in parts], np.int64)
    order = np.argsort(rows, kind="stable")
    return QueryRanks(
        rows[order],
        _cat([p.first_rank for p in parts], np.int64)[order],
        _cat([p.ap for p in parts], np.float64)[order],
        sum(p.skipped for p in parts),
    )


def _validate(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_groups: np.ndarray,
    gallery_groups: np.ndarray,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q = _as_matrix(queries, "queries")
    g = _as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise UserInputError(
            f"queries have dimension {q.shape[1]} but gallery has dimension {g.shape[1]}"
        )
    qg = _as_vector(query_groups, len(q), "query_groups")
    gg = _as_vector(gallery_groups, len(g), "gallery_groups")
    if exclude is None:
        ex = np.full(len(q), -1, dtype=np.int64)
    else:
        ex = _as_vector(exclude, len(q), "exclude")
        if ex.min() < -1 or ex.max() >= len(g):
            raise UserInputError(f"exclude must hold gallery indices in [-1, {len(g) - 1}]")
    return q, g, qg, gg, ex


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UserInputError(f"{name} must be a non-empty (rows, dim) array, got shape {x.shape}")
    # float32 halves memory and matches what encoders produce; copy only when needed
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserInputError(f"{name} contain NaN or infinite values")
    return x


def _as_vector(x: np.ndarray, length: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (length,):
        raise UserInputError(f"{name} must have shape ({length},), got {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise UserInputError(f"{name} must be integers, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` as sorted unique cut-offs; ``UserInputError`` unless each is >= 1."""
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise UserInputError(f"ks must be positive integers, got {list(ks)}")
    return out


def _group_index(gallery_groups: np.ndarray) -> dict[int, np.ndarray]:
    """Map each group to the sorted gallery indices of its members."""
    order = np.argsort(gallery_groups, kind="stable")
    groups, starts = np.unique(gallery_groups[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(gr): order[s:e] for gr, s, e in zip(groups, starts, ends)}


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _score_chunk(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_groups: np.ndarray,
    exclude: np.ndarray,
    positives: dict[int, np.ndarray],
    offset: int,
) -> QueryRanks:
    scores = queries @ gallery.T
    rows = np.flatnonzero(exclude >= 0)
    # -inf sits below every finite score, so an excluded item never outranks a positive
    scores[rows, exclude[rows]] = -np.inf
    blocks, skipped = _positive_blocks(scores, query_groups, exclude, positives)
    # sort in place once the positives' scores are copied out: one (chunk, N) buffer, not two;
    # ascending rows give "how many items score >= s" by one binary search
    scores.sort(axis=1)
    ranked = [_rank_positives(scores, *block) for block in blocks]
    skipped += sum(len(b[0]) - len(r[0]) for b, r in zip(blocks, ranked))
    return QueryRanks(
        _cat([r[0] for r in ranked], np.int64) + offset,
        _cat([r[1] for r in ranked], np.int64),
        _cat([r[2] for r in ranked], np.float64),
        skipped,
    )


def _positive_blocks(
    scores: np.ndarray,
    query_groups: np.ndarray,
    exclude: np.ndarray,
    positives: dict[int, np.ndarray],
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    """Group the chunk's queries by positive set.

    Returns ``(rows, ascending positive scores, positive count)`` blocks and the number of
    queries whose group has no gallery item.
    """
    blocks = []
    skipped = 0
    for group in np.unique(query_groups):
        members = np.flatnonzero(query_groups == group)
        pos = positives.get(int(group))
        if pos is None:
            skipped += len(members)
            continue
        step = max(1, _BLOCK_ELEMS // len(pos))
        for start in range(0, len(members), step):
            rows = members[start : start + step]
            asc = np.sort(scores[np.ix_(rows, pos)], axis=1)
            # an excluded positive (-inf) no longer counts as one
            n_pos = len(pos) - np.isin(exclude[rows], pos).astype(np.int64)
            blocks.append((rows, asc, n_pos))
    return blocks, skipped


def _rank_positives(
    sorted_scores: np.ndarray, rows: np.ndarray, asc: np.ndarray, n_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows kept, first-positive rank and AP for query ``rows`` from their positives' scores.

    With positives sorted by descending score ``a_1 >= ... >= a_P``, the pessimistic rank of the
    i-th positive is ``i + #negatives(score >= a_i)``, and
    ``#negatives(score >= a) = #all(score >= a) - #positives(score >= a)``.
    """
    n, p = sorted_scores.shape[1], asc.shape[1]
    desc = asc[:, ::-1]
    # per-row binary searches: numpy has no batched searchsorted and torch's is slow on
    # small, contended CPUs
    below = np.stack([np.searchsorted(sorted_scores[r], d) for r, d in zip(rows, desc)])
    all_ge = n - below
    pos_ge = p - _first_of_ties(asc)[:, ::-1]
    i = np.arange(1, p + 1)
    ranks = i + all_ge - pos_ge
    # an excluded positive sorts last (-inf): mask it out of the AP sum
    valid = i[None, :] <= n_pos[:, None]
    ap_sum = np.where(valid, i / ranks, 0.0).sum(axis=1)
    keep = n_pos > 0
    return rows[keep], ranks[keep, 0].astype(np.int64), ap_sum[keep] / n_pos[keep]


def _first_of_ties(asc: np.ndarray) -> np.ndarray:
    """Index of the first element equal to each element of row-wise ascending ``asc``."""
    idx = np.arange(asc.shape[1])
    starts = np.ones(asc.shape, dtype=bool)
    starts[:, 1:] = asc[:, 1:] != asc[:, :-1]
    return np.maximum.accumulate(np.where(starts, idx, 0), axis=1)


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _summarise(r: QueryRanks, ks: tuple[int, ...]) -> RetrievalMetrics:
    first = r.first_rank
    if len(first) == 0:
        raise NoPositivesError(
            f"none of the {r.skipped} queries has a positive in the gallery: check that query "
            "and gallery groups (labels / ids) refer to the same items"
        )
    return RetrievalMetrics(
        recall={k: float(np.mean(first <= k)) for k in ks},
        precision_at_1=float(np.mean(first <= 1)),
        map=float(np.mean(r.ap)),
        median_rank=float(np.median(first)),
        mean_rank=float(np.mean(first)),
        queries=len(first),
        skipped=r.skipped,
    )
