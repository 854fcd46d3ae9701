"""Cross-modal retrieval evaluation for every ordered modality pair of a corpus."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modalign.retrieval.embed import Embeddings, EncoderModel, embed_source
from modalign.retrieval.metrics import NoPositivesError, QueryRanks, query_ranks, validate_ks

Level = Literal["auto", "class", "instance"]


def positive_groups(
    emb: Mapping[str, Embeddings], level: Level = "auto"
) -> tuple[dict[str, np.ndarray], str]:
    """Integer group per item: its class (labels) or its item id (instance-level).

    ``auto`` uses classes when every item has a label, else item ids.
    """
    labelled = all(lab is not None for e in emb.values() for lab in e.labels)
    use_class = level == "class" or (level == "auto" and labelled)
    if use_class and not labelled:
        raise ValueError("class-level retrieval needs a label on every item")
    keys = sorted(
        {(lab if use_class else i) for e in emb.values() for lab, i in zip(e.labels, e.ids)},
        key=str,
    )
    code = {k: n for n, k in enumerate(keys)}
    groups = {
        m: np.array(
            [code[lab if use_class else i] for lab, i in zip(e.labels, e.ids)], dtype=np.int64
        )
        for m, e in emb.items()
    }
    return groups, "class" if use_class else "instance"


def evaluate_pairs(
    emb: Mapping[str, Embeddings],
    level: Level = "auto",
    ks: Sequence[int] = (1, 5, 10),
    pairs: Sequence[tuple[str, str]] | None = None,
    chunk_size: int = 1024,
    on_ranks: Callable[[str, QueryRanks], None] | None = None,
) -> dict[str, Any]:
    """Recall@K, mAP, median/mean rank for each ``query->gallery`` pair of modalities.

    Returns the ``evaluate retrieval`` JSON shape: ``{"pairs": {"audio->image": {...}},
    "queries": N, "level": "class"|"instance"}``. ``on_ranks(pair, ranks)``, when given,
    receives each pair's per-query ranks (:class:`~modalign.retrieval.metrics.QueryRanks`),
    e.g. for a paired comparison of two models on the same queries.
    """
    ks = validate_ks(ks)  # a bad cut-off fails before any pair is ranked
    groups, used = positive_groups(emb, level)
    mods = sorted(emb)
    pairs = pairs or [(q, g) for q in mods for g in mods if q != g]
    result: dict[str, Any] = {"pairs": {}, "level": used}
    for q, g in pairs:
        ranks = query_ranks(
            emb[q].vectors, emb[g].vectors, groups[q], groups[g], chunk_size=chunk_size
        )
        metrics = ranks.metrics(ks)  # raises NoPositivesError before on_ranks sees the pair
        if on_ranks is not None:
            on_ranks(f"{q}->{g}", ranks)
        result["pairs"][f"{q}->{g}"] = metrics.to_dict()
    result["queries"] = len({i for e in emb.values() for i in e.ids})
    return result


def make_validator(
    src: str | Path,
    *,
    level: Level = "auto",
    ks: Sequence[int] = (1, 5),
    max_items: int | None = 5000,
    batch_size: int = 128,
    num_workers: int = 0,
    on_ranks: Callable[[str, QueryRanks], None] | None = None,
) -> Callable[[EncoderModel, int], dict[str, Any]]:
    """An ``evaluate(model, step)`` callback for ``pretrain(..., evaluate=...)``.

    Embeds ``src`` (up to ``max_items`` items) with the shared embedding loop
    (:func:`modalign.retrieval.embed.embed_source`) and scores every ordered modality pair with
    :func:`evaluate_pairs`, exactly as ``modalign evaluate retrieval`` does (pessimistic ties).
    Returns ``{"audio->image": {"recall@1": ..., "map": ..., ...}, ...}``; a pair without any
    positive is left out rather than stopping the training run. ``on_ranks`` is passed to
    :func:`evaluate_pairs` (each validation's per-query ranks, pair by pair).
    """

    def evaluate(model: EncoderModel, step: int) -> dict[str, Any]:
        emb, _bad = embed_source(
            model, src, batch_size=batch_size, num_workers=num_workers, max_items=max_items
        )
        mods = sorted(emb)
        out: dict[str, Any] = {}
        for pair in [(q, g) for q in mods for g in mods if q != g]:
            try:  # same groups as the all-pairs call: one pair at a time gives the same figures
                out.update(
                    evaluate_pairs(emb, level=level, ks=ks, pairs=[pair], on_ranks=on_ranks)[
                        "pairs"
                    ]
                )
            except NoPositivesError:
                continue  # a pair with no positives (e.g. disjoint items) is left out, not fatal
        return out

    return evaluate
