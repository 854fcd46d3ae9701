"""Tests for modalign.retrieval.metrics against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.retrieval.metrics import NoPositivesError, RetrievalMetrics, retrieval_metrics


def reference_metrics(q, g, qg, gg, ks=(1, 5, 10), exclude=None) -> dict:
    """Full sort per query, python loops, pessimistic ties (negatives first on equal score)."""
    first_ranks, aps, skipped = [], [], 0
    for i in range(len(q)):
        items = []
        for j in range(len(g)):
            if exclude is not None and exclude[i] == j:
                continue
            score = float(np.dot(q[i].astype(np.float64), g[j].astype(np.float64)))
            items.append((score, qg[i] == gg[j]))
        # sort key: higher score first; on equal score negatives (False) first
        items.sort(key=lambda t: (-t[0], t[1]))
        pos_ranks = [r + 1 for r, (_, p) in enumerate(items) if p]
        if not pos_ranks:
            skipped += 1
            continue
        first_ranks.append(pos_ranks[0])
        aps.append(np.mean([(n + 1) / r for n, r in enumerate(pos_ranks)]))
    first = np.array(first_ranks)
    out = {f"recall@{k}": float(np.mean(first <= k)) for k in ks}
    out.update(
        map=float(np.mean(aps)),
        median_rank=float(np.median(first)),
        mean_rank=float(np.mean(first)),
        queries=len(first),
    )
    return out | {"skipped": skipped}


def quantised(rng: np.random.Generator, n: int, d: int, levels: int = 2) -> np.ndarray:
    """Small-integer vectors: inner products are exact in float32 and full of ties."""
    return rng.integers(-levels, levels + 1, size=(n, d)).astype(np.float32)


def check_against_reference(q, g, qg, gg, chunk_size, exclude=None, ks=(1, 5, 10)):
    got = retrieval_metrics(q, g, qg, gg, ks=ks, chunk_size=chunk_size, exclude=exclude)
    want = reference_metrics(q, g, qg, gg, ks=ks, exclude=exclude)
    assert got.skipped == want.pop("skipped")
    assert got.to_dict() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got.precision_at_1 == got.recall[1]
    return got


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_class_level_with_ties_matches_reference(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    q, g = quantised(rng, 37, 3), quantised(rng, 53, 3)
    qg, gg = rng.integers(0, 4, 37), rng.integers(0, 4, 53)
    check_against_reference(q, g, qg, gg, chunk_size)


def test_instance_level_matches_reference() -> None:
    rng = np.random.default_rng(1)
    g = quantised(rng, 40, 4)
    q = g + quantised(rng, 40, 4, levels=1)
    ids = np.arange(40)
    got = check_against_reference(q, g, ids, ids, chunk_size=9)
    assert got.queries == 40


def test_several_captions_per_image_matches_reference() -> None:
    rng = np.random.default_rng(2)
    images = quantised(rng, 20, 5)
    image_ids = np.arange(20)
    caption_ids = np.repeat(image_ids, 3)  # 3 captions per image
    captions = images[caption_ids] + quantised(rng, 60, 5, levels=2)
    # captions -> images and images -> captions (several positives per query)
    check_against_reference(captions, images, caption_ids, image_ids, chunk_size=11)
    check_against_reference(images, captions, image_ids, caption_ids, chunk_size=6)


def test_exclude_matches_reference() -> None:
    rng = np.random.default_rng(3)
    x = quantised(rng, 45, 3)
    groups = rng.integers(0, 5, 45)
    exclude = np.arange(45)
    exclude[::4] = -1  # some queries keep themselves
    got = check_against_reference(x, x, groups, groups, chunk_size=8, exclude=exclude)
    # without exclusion each query would find itself at rank <= ties; exclusion must matter
    plain = retrieval_metrics(x, x, groups, groups, chunk_size=8)
    assert plain.map != got.map


def test_exclude_only_positive_skips_query() -> None:
    x = np.eye(3, dtype=np.float32)
    groups = np.array([0, 1, 1])
    got = retrieval_metrics(x, x, groups, groups, exclude=np.arange(3))
    assert (got.queries, got.skipped) == (2, 1)


def test_queries_without_positives_are_skipped_and_counted() -> None:
    rng = np.random.default_rng(4)
    q, g = quantised(rng, 30, 3), quantised(rng, 25, 3)
    qg = rng.integers(0, 6, 30)  # groups 4, 5 absent from the gallery
    gg = rng.integers(0, 4, 25)
    got = check_against_reference(q, g, qg, gg, chunk_size=7)
    assert got.skipped == int(np.sum(qg >= 4)) > 0
    assert got.queries + got.skipped == 30


def test_random_float_data_matches_reference() -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((25, 8)).astype(np.float32)
    g = rng.standard_normal((31, 8)).astype(np.float32)
    qg, gg = rng.integers(0, 3, 25), rng.integers(0, 3, 31)
    got = retrieval_metrics(q, g, qg, gg, chunk_size=4)
    want = reference_metrics(q, g, qg, gg)
    want.pop("skipped")
    assert got.to_dict() == pytest.approx(want, rel=1e-9)


def test_hand_computed_average_precision() -> None:
    # one query, scores 0.9 0.8 0.7 0.6 0.5 with positives at ranks 1, 3, 5
    q = np.array([[1.0]], dtype=np.float32)
    g = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]], dtype=np.float32)
    gg = np.array([7, 0, 7, 0, 7])
    got = retrieval_metrics(q, g, np.array([7]), gg)
    assert got.map == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert got.recall == {1: 1.0, 5: 1.0, 10: 1.0}
    assert (got.median_rank, got.mean_rank, got.queries) == (1.0, 1.0, 1)


def test_constant_embedding_gets_worst_score() -> None:
    # every score ties: pessimistic ordering puts all negatives ahead of all positives
    q = np.ones((4, 2), dtype=np.float32)
    g = np.ones((10, 2), dtype=np.float32)
    gg = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    got = retrieval_metrics(q, g, np.zeros(4, np.int64), gg)
    assert got.mean_rank == 9.0
    assert got.recall[5] == 0.0
    assert got.map == pytest.approx((1 / 9 + 2 / 10) / 2)


def test_chunking_gives_identical_results() -> None:
    rng = np.random.default_rng(6)
    q, g = quantised(rng, 203, 6), quantised(rng, 150, 6)
    qg, gg = rng.integers(0, 10, 203), rng.integers(0, 10, 150)
    exclude = rng.integers(-1, 150, 203)
    results = [
        retrieval_metrics(q, g, qg, gg, chunk_size=c, exclude=exclude) for c in (1, 13, 100, 4096)
    ]
    assert all(r == results[0] for r in results[1:])


def test_to_dict_keys() -> None:
    x = np.eye(4, dtype=np.float32)
    got = retrieval_metrics(x, x, np.arange(4), np.arange(4))
    assert isinstance(got, RetrievalMetrics)
    assert list(got.to_dict()) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "map",
        "median_rank",
        "mean_rank",
        "queries",
    ]
    assert got.to_dict()["map"] == 1.0


def test_no_positives_at_all_raises() -> None:
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(NoPositivesError, match="none of the 3 queries"):
        retrieval_metrics(x, x, np.array([0, 0, 0]), np.array([1, 1, 1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queries": np.zeros((0, 3))}, "non-empty"),
        ({"gallery": np.zeros((4, 2))}, "dimension 3 but gallery has dimension 2"),
        ({"query_groups": np.zeros(2, np.int64)}, r"query_groups must have shape \(3,\)"),
        ({"gallery_groups": np.zeros(4)}, "must be integers"),
        ({"exclude": np.array([0, 1, 9])}, "exclude must hold"),
        ({"ks": (0, 5)}, "ks must be positive"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"queries": np.full((3, 3), np.nan)}, "NaN"),
    ],
)
def test_bad_input_raises_user_error(kwargs: dict, match: str) -> None:
    args = {
        "queries": np.ones((3, 3)),
        "gallery": np.ones((4, 3)),
        "query_groups": np.zeros(3, np.int64),
        "gallery_groups": np.zeros(4, np.int64),
    }
    with pytest.raises(UserInputError, match=match):
        retrieval_metrics(**(args | kwargs))


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_query_ranks_are_each_query_alone_in_query_order(chunk_size: int) -> None:
    """``query_ranks`` (what the benchmark bootstraps) equals scoring every query on its own,
    in query order, with ties, exclusions and positive-less queries (left out, counted)."""
    from modalign.retrieval.metrics import query_ranks

    rng = np.random.default_rng(3)
    q, g = quantised(rng, 29, 3), quantised(rng, 41, 3)
    qg, gg = rng.integers(0, 6, 29), rng.integers(0, 5, 41)  # group 5 has no gallery item
    exclude = rng.integers(-1, 41, 29)
    r = query_ranks(q, g, qg, gg, chunk_size=chunk_size, exclude=exclude)
    rows, firsts, aps = [], [], []
    for i in range(len(q)):
        want = reference_metrics(q[i : i + 1], g, qg[i : i + 1], gg, exclude=exclude[i : i + 1])
        if want["skipped"]:
            continue
        rows.append(i)
        firsts.append(want["mean_rank"])
        aps.append(want["map"])
    assert r.skipped == len(q) - len(rows) > 0
    assert r.rows.tolist() == rows
    assert r.first_rank.tolist() == firsts
    assert r.ap == pytest.approx(aps, rel=1e-12)
    assert r.recall_at(1).tolist() == [float(f <= 1) for f in firsts]
