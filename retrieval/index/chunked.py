"""Chunked index build from vectors on disk: memory bounded by the index, not by the corpus.

:func:`build_chunked` trains on a sample gathered row by row from the ``.npy`` files (the same
rows :meth:`VectorIndex.build` would pick in RAM), adds the files one at a time (an IVF index's
lists sized exactly first, from a pass of coarse assignments: :func:`add_chunks`), and tunes
recall against exact top-k computed file by file. So a chunked build over files equals an
in-RAM build over their concatenation: same ids in the same order, same trained quantiser.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from modalign.core.errors import UserInputError
from modalign.retrieval.index import (
    BuildStats,
    VectorIndex,
    as_vectors,
    check_ids,
    train_rows,
)
from modalign.retrieval.index.factory import METRICS, make_index, set_ef_construction, train_size
from modalign.retrieval.index.options import IndexBuildOptions
from modalign.retrieval.index.tuning import TUNE_K, drop_rows, tunable_param, tuning_rows

__all__ = ["ShardVectors", "add_chunks", "build_chunked"]


@dataclass
class ShardVectors:
    """Row-aligned ``(n_i, dim)`` float32 ``.npy`` files read one at a time (never all at once)."""

    files: list[Path]
    sizes: list[int]
    dim: int

    @classmethod
    def open(cls, files: Sequence[str | Path]) -> ShardVectors:
        """Read only the headers: sizes and dimension (UserInputError naming a bad file)."""
        paths, sizes, dims = [Path(f) for f in files], [], set()
        for p in paths:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 2:
                raise UserInputError(f"{p}: expected a 2-D (n, dim) array, got {arr.shape}")
            sizes.append(int(arr.shape[0]))
            dims.add(int(arr.shape[1]))
            del arr
        if len(dims) != 1:
            raise UserInputError(f"vector files disagree on the dimension: {sorted(dims)}")
        return cls(paths, sizes, dims.pop())

    @property
    def n(self) -> int:
        """Total number of rows."""
        return sum(self.sizes)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted global positions ``rows``, gathered file by file through a mmap."""
        out = np.empty((len(rows), self.dim), np.float32)
        start, pos = 0, 0
        for path, size in zip(self.files, self.sizes):
            hi = int(np.searchsorted(rows, start + size))
            if hi > pos:
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                out[pos:hi] = mapped[rows[pos:hi] - start]
                del mapped  # unmapped: its pages leave this process
            pos, start = hi, start + size
        return out

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, vectors)`` of each file in order."""
        start = 0
        for path in self.files:
            x = np.load(path, allow_pickle=False)
            yield start, x
            start += len(x)


def build_chunked(
    vectors: ShardVectors,
    ids: Sequence[str],
    options: IndexBuildOptions | None = None,
    *,
    fingerprint: str = "",
    tuning_queries: np.ndarray | None = None,
) -> VectorIndex:
    """:meth:`VectorIndex.build` over ``vectors`` on disk (same arguments, same result)."""
    opts = options or IndexBuildOptions()
    n, dim = vectors.n, vectors.dim
    if n == 0:
        raise UserInputError("embeddings are empty: got 0 vectors")
    id_list = check_ids(ids, n, existing=())
    metric, seed = opts.metric, opts.seed
    tq = None if tuning_queries is None else as_vectors(tuning_queries, "tuning_queries", dim)
    factory = opts.factory_for(n, dim)
    start = time.perf_counter()
    cpu_index = make_index(dim, factory, metric, seed)
    if opts.ef_construction is not None:
        set_ef_construction(cpu_index, opts.ef_construction)
    knob = tunable_param(cpu_index)
    size = 0 if cpu_index.is_trained else min(n, train_size(cpu_index))
    built = VectorIndex(cpu_index, [], factory, metric, fingerprint, BuildStats(), opts.device)
    stats = built.stats
    stats.train_size = size
    t = time.perf_counter()
    if size:
        built.train_on(vectors.take(train_rows(n, size, seed)))
    stats.train_seconds = time.perf_counter() - t
    t = time.perf_counter()
    add_chunks(built, vectors, id_list)
    stats.add_seconds = time.perf_counter() - t
    if knob is not None and n > 1:
        t = time.perf_counter()
        built.tune_with(chunked_tuning_set(vectors, metric, seed, tq), knob, opts.target_recall)
        stats.tune_seconds = time.perf_counter() - t
    stats.build_seconds = time.perf_counter() - start
    return built


def add_chunks(built: VectorIndex, vectors: ShardVectors, ids: list[str]) -> None:
    """Add every file to ``built``; a plain CPU IVF index gets exactly sized inverted lists.

    Appending grows each inverted list like a ``std::vector`` (capacity doubling, the old buffer
    copied and freed), so peak memory ends up well above the final codes. For a CPU
    ``IndexIVF`` with array lists the files are read twice instead: first every row's list
    (the coarse assignment ``add`` would do anyway, 8 bytes per row), then each list is
    reserved at its final size and the rows are added with those assignments.
    """
    found = _array_ivf(built)
    if found is None:
        for first, x in vectors.chunks():
            built.add(x, ids[first : first + len(x)], new=True)
        return
    ivf, invlists = found
    lists = [ivf.quantizer.assign(x, 1).ravel() for _, x in vectors.chunks()]
    sizes = np.bincount(np.concatenate(lists), minlength=ivf.nlist)
    for list_no in np.flatnonzero(sizes):
        invlists.resize(int(list_no), int(sizes[list_no]))  # allocate once ...
        invlists.resize(int(list_no), 0)  # ... and keep the capacity
    for (first, x), assign in zip(vectors.chunks(), lists):
        built.add_assigned(x, ids[first : first + len(x)], assign)


def _array_ivf(built: VectorIndex) -> tuple[faiss.IndexIVF, faiss.ArrayInvertedLists] | None:
    """The index itself and its lists if it is an empty CPU IVF index over array lists."""
    if built.device != "cpu" or len(built) > 0:
        return None
    index = faiss.downcast_index(built._cpu_index())
    if not isinstance(index, faiss.IndexIVF) or index.ntotal > 0 or index.invlists is None:
        return None
    lists = faiss.downcast_InvertedLists(index.invlists)
    return (index, lists) if isinstance(lists, faiss.ArrayInvertedLists) else None


def chunked_tuning_set(
    vectors: ShardVectors, metric: str, seed: int, queries: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~.index_tuning.tuning_set` with the exact top-k merged file by file."""
    if queries is None:
        rows = tuning_rows(vectors.n, seed)
        queries = vectors.take(rows)
    else:
        rows = np.full(len(queries), -1, dtype=np.int64)
    k = min(TUNE_K, vectors.n - int(rows[0] >= 0))
    truth = exact_topk(queries, vectors, k + 1, metric)
    return queries, drop_rows(truth, rows, k), rows


def exact_topk(queries: np.ndarray, vectors: ShardVectors, k: int, metric: str) -> np.ndarray:
    """Global row labels of the exact top-``k`` of each query, best first, one file at a time."""
    higher_better = metric == "ip"
    best_d = np.full((len(queries), 0), 0.0, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for first, x in vectors.chunks():
        d, i = faiss.knn(queries, x, min(k, len(x)), metric=METRICS[metric])
        best_d = np.concatenate([best_d, d], axis=1)
        best_i = np.concatenate([best_i, np.where(i >= 0, i + first, -1)], axis=1)
        order = np.argsort(-best_d if higher_better else best_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(best_d, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    return best_i
