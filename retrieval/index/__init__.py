"""FAISS vector index: the :class:`VectorIndex` type (build, add, search, save, load).

The same code drives faiss-cpu and faiss-gpu: the index is built from a FAISS ``index_factory``
string, optionally moved to a GPU with ``faiss.index_cpu_to_gpu``, and always saved as a CPU index.
Responsibilities live in sibling modules:

* :mod:`~modalign.retrieval.index.factory`: ``factory="auto"`` selection and construction;
* :mod:`~modalign.retrieval.index.tuning`: recall tuning of ``nprobe`` / ``efSearch``;
* :mod:`~modalign.retrieval.index.store`: the directory format and its atomic save/load.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from modalign.core.errors import UserInputError
from modalign.retrieval.index.factory import (
    choose_factory,
    make_index,
    metric_name,
    parse_device,
    set_ef_construction,
    train_size,
)
from modalign.retrieval.index.options import IndexBuildOptions
from modalign.retrieval.index.store import (
    IndexFileError,
    IndexFingerprintError,
    has_ondisk_lists,
    read_index_dir,
    save_index_dir,
)
from modalign.retrieval.index.tuning import (
    GPU_MAX_K,
    apply_params,
    tunable_param,
    tune_on,
    tuning_set,
)

__all__ = [
    "BuildStats",
    "IndexBuildOptions",
    "IndexFileError",
    "IndexFingerprintError",
    "SearchResult",
    "VectorIndex",
    "choose_factory",
]

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Nearest neighbours of each query, best first.

    Attributes:
        scores: ``(Q, k)`` float32 similarities (inner product for ``ip``, minus squared L2
            distance for ``l2``, so higher is always better). Slots an approximate index could
            not fill are ``-inf``.
        ids: per query, the ids of the found items (shorter than k only where scores are -inf).
    """

    scores: np.ndarray
    ids: list[list[str]]


@dataclass
class BuildStats:
    """How an index was built and tuned (saved in ``index.json``)."""

    build_seconds: float = 0.0
    train_seconds: float = 0.0
    add_seconds: float = 0.0
    tune_seconds: float = 0.0
    train_size: int = 0
    search_params: dict[str, int] = field(default_factory=dict)
    target_recall: float | None = None
    measured_recall: float | None = None
    recall_lower_bound: float | None = None
    tune_queries: int = 0
    # sharded build only: one record per shard process (rows, seconds, peak RSS bytes)
    shards: list[dict[str, Any]] = field(default_factory=list)
    merge_seconds: float = 0.0


class VectorIndex:
    """Id-addressed vector index over a FAISS index (CPU or GPU)."""

    def __init__(
        self,
        index: faiss.Index,
        ids: list[str],
        factory: str,
        metric: str,
        fingerprint: str = "",
        stats: BuildStats | None = None,
        device: str = "cpu",
    ) -> None:
        """Wrap a built CPU FAISS ``index`` whose row i is ``ids[i]``; see :meth:`build`."""
        if index.ntotal != len(ids):
            raise UserInputError(f"index holds {index.ntotal} vectors but {len(ids)} ids")
        self.factory = factory
        self.metric = metric_name(metric)
        self.fingerprint = fingerprint
        self.stats = stats or BuildStats()
        self.device = device
        self._ids = ids
        self._gpu_resources: Any = None
        self._index = self._to_device(index, device)
        apply_params(self._index, self.stats.search_params, self._gpu_resources is not None)

    # ------------------------------------------------------------------ build / add / search

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        options: IndexBuildOptions | None = None,
        *,
        fingerprint: str = "",
        tuning_queries: np.ndarray | None = None,
    ) -> VectorIndex:
        """Build, train and tune an index over ``embeddings`` (row i has id ``ids[i]``).

        Args:
            embeddings: ``(N, D)`` vectors (L2-normalised for cosine with ``metric="ip"``).
            ids: N unique string ids (no line breaks).
            options: index type, metric, budget, recall target, device, seed
                (:class:`IndexBuildOptions`; default: ``IndexBuildOptions()``).
            fingerprint: fingerprint of the model that produced the embeddings.
            tuning_queries: optional ``(Q, D)`` real queries to tune recall on (e.g. text
                embeddings for an image index: cross-modal queries lie farther from the corpus
                than corpus points do). Default: 1000 held-out corpus vectors, leave-one-out.
        """
        opts = options or IndexBuildOptions()
        x = as_vectors(embeddings, "embeddings")
        tq = (
            None
            if tuning_queries is None
            else as_vectors(tuning_queries, "tuning_queries", x.shape[1])
        )
        id_list = check_ids(ids, len(x), existing=())
        factory = opts.factory_for(len(x), x.shape[1])
        start = time.perf_counter()
        cpu_index = make_index(x.shape[1], factory, opts.metric, opts.seed)
        if opts.ef_construction is not None:
            set_ef_construction(cpu_index, opts.ef_construction)
        built = cls(cpu_index, [], factory, opts.metric, fingerprint, BuildStats(), opts.device)
        built._fill(x, id_list, cpu_index, opts.target_recall, opts.seed, tq)
        built.stats.build_seconds = time.perf_counter() - start
        log.info("built %s over %d vectors in %.1fs", factory, len(x), built.stats.build_seconds)
        return built

    def _fill(
        self,
        x: np.ndarray,
        ids: list[str],
        cpu_index: faiss.Index,
        target_recall: float,
        seed: int,
        tuning_queries: np.ndarray | None,
    ) -> None:
        """Train, add and tune a freshly built index, timing each step into ``stats``."""
        # inspect the CPU form: GPU indexes do not expose their structure the same way
        knob = tunable_param(cpu_index)
        size = 0 if cpu_index.is_trained else min(len(x), train_size(cpu_index))
        stats = self.stats
        stats.train_size = size
        stats.train_seconds = _timed(lambda: self._train(x, size, seed))
        stats.add_seconds = _timed(lambda: self.add(x, ids))
        if knob is not None and len(x) > 1:
            tset = lambda: tuning_set(x, self.metric, seed, tuning_queries)  # noqa: E731
            stats.tune_seconds = _timed(lambda: self.tune_with(tset(), knob, target_recall))

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Item ids in FAISS row order (a copy)."""
        return list(self._ids)

    def add(self, embeddings: np.ndarray, ids: Sequence[str], *, new: bool = False) -> None:
        """Append vectors to the index without retraining or rebuilding it.

        ``new=True``: the caller has checked that ``ids`` are unique and not yet in the index
        (a chunked build checks all ids once instead of once per chunk).
        """
        x = as_vectors(embeddings, "embeddings", self.dim)
        new_ids = check_ids(ids, len(x), existing=() if new else self._ids)
        self.check_growable()
        self._index.add(x)
        self._ids.extend(new_ids)

    def add_assigned(self, embeddings: np.ndarray, ids: Sequence[str], lists: np.ndarray) -> None:
        """Append new vectors to a CPU IVF index whose inverted ``lists`` are already known.

        ``lists[i]`` is ``quantizer.assign`` of row i (what ``add`` would compute); the caller
        has checked the ids as for ``add(..., new=True)``. A chunked build uses this to size
        the inverted lists exactly before filling them.
        """
        x = as_vectors(embeddings, "embeddings", self.dim)
        new_ids = check_ids(ids, len(x), existing=())
        assign = np.ascontiguousarray(lists, dtype=np.int64)
        if assign.shape != (len(x),):
            raise UserInputError(f"got {len(x)} vectors but {assign.shape} list assignments")
        if not isinstance(self._index, faiss.IndexIVF):
            raise UserInputError(f"list assignments need a CPU IVF index, not {self.factory!r}")
        self._index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assign))
        self._ids.extend(new_ids)

    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """Return the ``k`` best items per query (k is clipped to the index size).

        Each query row is searched independently: a batch of queries gives, row by row, the
        same results as searching them one at a time.
        """
        q = as_vectors(queries, "queries", self.dim, allow_single=True)
        if k < 1:
            raise UserInputError(f"k must be >= 1, got {k}")
        k = min(k, len(self._ids))
        if self._gpu_resources is not None and k > GPU_MAX_K:
            raise UserInputError(f"k={k} exceeds the GPU limit of {GPU_MAX_K}; use device='cpu'")
        scores, labels = self._index.search(q, k)
        scores = scores.astype(np.float32, copy=False)
        if self.metric == "l2":
            scores = -scores  # distances -> similarities: higher is better for every metric
        scores[labels < 0] = -np.inf
        ids = [[self._ids[j] for j in row if j >= 0] for row in labels]
        return SearchResult(scores=scores, ids=ids)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index atomically to ``directory`` and return its path.

        Files are staged in a temporary sibling directory and renamed over the old one
        (:func:`modalign.core.artifact.atomic_dir`), so a crash mid-write leaves the previous
        index intact and loadable.
        """
        return save_index_dir(Path(directory), self._cpu_index(), self._ids, self.manifest())

    def manifest(self) -> dict[str, Any]:
        """What index.json records besides format and checksums (factory, metric, stats...)."""
        return {
            "factory": self.factory,
            "metric": self.metric,
            "dim": self.dim,
            "count": len(self._ids),
            "fingerprint": self.fingerprint,
            "search_params": self.stats.search_params,
            "build": asdict(self.stats),
        }

    @property
    def on_disk(self) -> bool:
        """True for a sharded build's index: inverted lists memory-mapped from index.ivfdata."""
        return self._gpu_resources is None and has_ondisk_lists(self._index)

    def check_growable(self) -> None:
        """UserInputError when items cannot be added in place (a sharded, on-disk index)."""
        if self.on_disk:
            raise UserInputError(
                "a sharded (on-disk) index cannot grow in place: its lists are the verified "
                "index.ivfdata file; rebuild it with `modalign index build --embeddings DIR "
                "--shards N` over all the embeddings"
            )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        device: str = "cpu",
        mmap: bool = False,
    ) -> VectorIndex:
        """Load an index saved by :meth:`save` (``mmap=True``: memory-mapped, read-only).

        Raises:
            IndexFileError: a file is missing, truncated or corrupt.
            IndexFingerprintError: ``expected_fingerprint`` is given and differs from the
                fingerprint of the model the index was built with.
        """
        index, ids, meta = read_index_dir(Path(directory), expected_fingerprint, mmap)
        known = {f.name for f in fields(BuildStats)}
        stats = BuildStats(**{k: v for k, v in meta.get("build", {}).items() if k in known})
        return cls(index, ids, meta["factory"], meta["metric"], meta["fingerprint"], stats, device)

    # ------------------------------------------------------------------ internals

    def _to_device(self, index: faiss.Index, device: str) -> faiss.Index:
        gpu = parse_device(device)
        if gpu is None:
            return index
        if faiss.get_num_gpus() == 0:
            raise UserInputError(
                f"device={device!r} but FAISS sees no GPU (faiss-cpu installed or no CUDA "
                "device); install faiss-gpu or use device='cpu'"
            )
        self._gpu_resources = faiss.StandardGpuResources()
        try:
            return faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)
        except RuntimeError as err:
            raise UserInputError(
                f"index type {self.factory!r} cannot run on GPU ({err}); pick an IVF or Flat "
                "factory or use device='cpu'"
            ) from err

    def _cpu_index(self) -> faiss.Index:
        if self._gpu_resources is None:
            return self._index
        return faiss.index_gpu_to_cpu(self._index)

    def _train(self, x: np.ndarray, size: int, seed: int) -> None:
        """Train on ``size`` random rows (k-means cost grows with the sample, not with N)."""
        if size == 0:
            return
        self.train_on(x[train_rows(len(x), size, seed)])

    def train_on(self, sample: np.ndarray) -> None:
        """Train the (empty) index on ``sample`` rows; a UserInputError if FAISS refuses."""
        size = len(sample)
        try:
            self._index.train(sample)
        except RuntimeError as err:  # e.g. fewer training points than IVF lists
            raise UserInputError(
                f"cannot train {self.factory!r} on {size} vectors ({err}); use a smaller "
                "index (fewer IVF lists) or factory='auto'"
            ) from err

    def tune_with(
        self, tset: tuple[np.ndarray, np.ndarray, np.ndarray], knob: tuple[str, int],
        target_recall: float,
    ) -> None:  # fmt: skip
        """Pick the smallest nprobe / efSearch reaching ``target_recall`` recall@10 on ``tset``
        (queries, their exact top-k, own rows: :func:`~.index_tuning.tuning_set`)."""
        on_gpu = self._gpu_resources is not None
        outcome = tune_on(self._index, tset, knob, target_recall, on_gpu, self.factory)
        self.stats.search_params = outcome.params
        self.stats.target_recall = target_recall
        self.stats.measured_recall = outcome.measured_recall
        self.stats.recall_lower_bound = outcome.recall_lower_bound
        self.stats.tune_queries = outcome.queries


def train_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted random rows of the training sample (the same for in-RAM and chunked builds)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def as_vectors(
    x: np.ndarray, name: str, dim: int | None = None, allow_single: bool = False
) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(n, dim)`` array, or UserInputError naming ``name``.

    Refuses empty input, a wrong ``dim`` and non-finite values; ``allow_single`` takes one vector.
    """
    arr = np.asarray(x)
    if allow_single and arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise UserInputError(f"{name} must be a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UserInputError(f"{name} is empty: got 0 vectors")
    if dim is not None and arr.shape[1] != dim:
        raise UserInputError(
            f"{name} have dimension {arr.shape[1]} but the index expects dimension {dim} "
            "(was it built with another model?)"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise UserInputError(f"{name} contain NaN or infinite values")
    return arr


def check_ids(ids: Sequence[str], n: int, existing: Sequence[str]) -> list[str]:
    """``ids`` as strings: one per vector, non-empty, single-line, unique, none in ``existing``."""
    out = [str(i) for i in ids]
    if len(out) != n:
        raise UserInputError(f"got {n} vectors but {len(out)} ids")
    bad = [i for i in out if not i or "\n" in i or "\r" in i]
    if bad:
        raise UserInputError(f"ids must be non-empty single-line strings, got {bad[0]!r}")
    if len(set(out)) != len(out):
        raise UserInputError("ids must be unique; found duplicates among the new ids")
    if existing:
        clash = set(out).intersection(existing)
        if clash:
            raise UserInputError(f"ids already in the index: {sorted(clash)[:5]}")
    return out
