"""How to build an index: the one options type every index build takes.

:class:`IndexBuildOptions` is passed, unchanged, through every builder
(:meth:`~modalign.retrieval.index.VectorIndex.build`,
:func:`~modalign.retrieval.index.chunked.build_chunked`,
:func:`~modalign.retrieval.index.corpus.build_corpus_index`,
:func:`~modalign.retrieval.index.from_shards.build_corpus_index_from_shards`, the sharded build
and the CLI), so a new knob is added in one place. What is *built from* (vectors, ids, the
model fingerprint, real tuning queries) stays an argument of each builder.
"""

from __future__ import annotations

from dataclasses import dataclass

from modalign.core.errors import UserInputError
from modalign.retrieval.index.factory import choose_factory, metric_name, parse_device

__all__ = ["IndexBuildOptions"]


@dataclass(frozen=True)
class IndexBuildOptions:
    """Index type, metric and build/tuning knobs (checked when constructed).

    Attributes:
        factory: ``"auto"`` or any FAISS ``index_factory`` string (e.g. ``"IVF1024,PQ48"``).
        metric: ``"ip"`` (inner product) or ``"l2"``.
        memory_budget_bytes: cap on index memory used by ``auto`` (None = no cap).
        target_recall: recall@10 vs exact search that tuning of nprobe/efSearch aims for.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seed for training-sample and tuning-query selection and k-means.
        ef_construction: HNSW build-time beam width (FAISS default 40); lower builds faster at
            some recall cost, which tuning of efSearch then makes up for. HNSW only.
    """

    factory: str = "auto"
    metric: str = "ip"
    memory_budget_bytes: int | None = None
    target_recall: float = 0.95
    device: str = "cpu"
    seed: int = 0
    ef_construction: int | None = None

    def __post_init__(self) -> None:
        metric_name(self.metric)
        parse_device(self.device)
        if not 0.0 < self.target_recall <= 1.0:
            raise UserInputError(f"target_recall must be in (0, 1], got {self.target_recall}")

    def factory_for(self, n: int, dim: int) -> str:
        """The factory string to build for ``n`` vectors of ``dim``: ``auto`` resolved."""
        if self.factory == "auto":
            return choose_factory(n, dim, self.memory_budget_bytes, self.device)
        return self.factory
