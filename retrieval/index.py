"""FAISS vector index with automatic index selection, recall tuning and atomic persistence.

The same code drives faiss-cpu and faiss-gpu: the index is built from a FAISS ``index_factory``
string, optionally moved to a GPU with ``faiss.index_cpu_to_gpu``, and always saved as a CPU index.

``factory="auto"`` picks the index type from corpus size, dimension and memory budget (in the
spirit of autofaiss): exact ``Flat`` for small corpora, ``HNSW32`` for medium ones, ``IVF*,Flat``
for large ones and ``IVF*,SQ8`` / ``IVF*,PQ*`` when the raw vectors do not fit the budget. Any
index with a search-time knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is then tuned: the
smallest (hence fastest) value whose recall@10 against exact search reaches ``target_recall`` on
held-out queries is kept and saved with the index.

Directory layout written by :meth:`VectorIndex.save`::

    index.faiss   the FAISS index (CPU form)
    ids.txt       one item id per line, line i = FAISS row i
    index.json    factory, metric, dim, count, fingerprint, search params, build stats, checksums
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import faiss
import numpy as np

from modalign.core.errors import UserInputError

__all__ = [
    "BuildStats",
    "IndexFileError",
    "IndexFingerprintError",
    "SearchResult",
    "VectorIndex",
    "choose_factory",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
META_FILE = "index.json"
_METRICS = MappingProxyType({"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2})
# Below this many vectors exact search is fast enough that approximation buys nothing.
FLAT_MAX_N = 50_000
# HNSW build time grows superlinearly and it cannot run on GPU; above this IVF builds faster.
HNSW_MAX_N = 500_000
# k-means cost is linear in the sample; FAISS asks for 39..256 points per centroid and 64 gives
# nearly the same lists as 256 at a quarter of the training time.
TRAIN_POINTS_PER_LIST = 64
TUNE_K = 10
TUNE_QUERIES = 1000
# faiss GPU kernels support k (and IVF nprobe) up to 2048.
GPU_MAX_K = 2048


class IndexFileError(UserInputError):
    """An index directory is missing, incomplete or corrupt."""


class IndexFingerprintError(UserInputError):
    """The index was built with a different model than the one asked for."""


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
    tune_queries: int = 0


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
        self.metric = _metric_name(metric)
        self.fingerprint = fingerprint
        self.stats = stats or BuildStats()
        self.device = device
        self._ids = ids
        self._gpu_resources: Any = None
        self._index = self._to_device(index, device)
        _apply_params(self._index, self.stats.search_params, self._gpu_resources is not None)

    # ------------------------------------------------------------------ build / add / search

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        factory: str = "auto",
        metric: str = "ip",
        memory_budget_bytes: int | None = None,
        target_recall: float = 0.95,
        device: str = "cpu",
        fingerprint: str = "",
        seed: int = 0,
        tuning_queries: np.ndarray | None = None,
        ef_construction: int | None = None,
    ) -> VectorIndex:
        """Build, train and tune an index over ``embeddings`` (row i has id ``ids[i]``).

        Args:
            embeddings: ``(N, D)`` vectors (L2-normalised for cosine with ``metric="ip"``).
            ids: N unique string ids (no line breaks).
            factory: ``"auto"`` or any FAISS ``index_factory`` string (e.g. ``"IVF1024,PQ48"``).
            metric: ``"ip"`` (inner product) or ``"l2"``.
            memory_budget_bytes: cap on index memory used by ``auto`` (None = no cap).
            target_recall: recall@10 vs exact search that tuning of nprobe/efSearch aims for.
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            fingerprint: fingerprint of the model that produced the embeddings.
            seed: seed for training-sample and tuning-query selection and k-means.
            tuning_queries: optional ``(Q, D)`` real queries to tune recall on (e.g. text
                embeddings for an image index: cross-modal queries lie farther from the corpus
                than corpus points do). Default: 1000 held-out corpus vectors, leave-one-out.
            ef_construction: HNSW build-time beam width (FAISS default 40); lower builds
                faster at some recall cost, which tuning of efSearch then makes up for.
        """
        x = _as_vectors(embeddings, "embeddings")
        tq = (
            None
            if tuning_queries is None
            else _as_vectors(tuning_queries, "tuning_queries", x.shape[1])
        )
        id_list = _check_ids(ids, len(x), existing=())
        metric_name = _metric_name(metric)
        if not 0.0 < target_recall <= 1.0:
            raise UserInputError(f"target_recall must be in (0, 1], got {target_recall}")
        if factory == "auto":
            factory = choose_factory(len(x), x.shape[1], memory_budget_bytes, device)
        start = time.perf_counter()
        cpu_index = _make_index(x.shape[1], factory, metric_name, seed)
        if ef_construction is not None:
            _set_ef_construction(cpu_index, ef_construction)
        # inspect the CPU form: GPU indexes do not expose their structure the same way
        knob = _tunable_param(cpu_index)
        train_size = 0 if cpu_index.is_trained else min(len(x), _train_size(cpu_index))
        built = cls(cpu_index, [], factory, metric_name, fingerprint, BuildStats(), device)
        stats = built.stats
        stats.train_size = train_size
        stats.train_seconds = _timed(lambda: built._train(x, train_size, seed))
        stats.add_seconds = _timed(lambda: built.add(x, id_list))
        if knob is not None and len(x) > 1:
            stats.tune_seconds = _timed(lambda: built._tune(x, knob, target_recall, seed, tq))
        stats.build_seconds = time.perf_counter() - start
        log.info("built %s over %d vectors in %.1fs", factory, len(x), stats.build_seconds)
        return built

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

    def add(self, embeddings: np.ndarray, ids: Sequence[str]) -> None:
        """Append vectors to the index without retraining or rebuilding it."""
        x = _as_vectors(embeddings, "embeddings", self.dim)
        new_ids = _check_ids(ids, len(x), existing=self._ids)
        self._index.add(x)
        self._ids.extend(new_ids)

    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """Return the ``k`` best items per query (k is clipped to the index size)."""
        q = _as_vectors(queries, "queries", self.dim, allow_single=True)
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

        Files go to a temporary sibling directory, are fsynced, and only then replace the old
        directory, so a crash mid-write leaves the previous index intact and loadable.
        """
        target = Path(directory)
        _check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self._write_files(tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        device: str = "cpu",
    ) -> VectorIndex:
        """Load an index saved by :meth:`save`.

        Raises:
            IndexFileError: a file is missing, truncated or corrupt.
            IndexFingerprintError: ``expected_fingerprint`` is given and differs from the
                fingerprint of the model the index was built with.
        """
        path = _resolve_dir(Path(directory))
        meta = _read_meta(path / META_FILE)
        _check_fingerprint(path, meta, expected_fingerprint)
        ids = _read_ids(path / IDS_FILE, meta)
        index = _read_index(path / INDEX_FILE, meta)
        if index.ntotal != len(ids) or index.d != meta["dim"]:
            raise IndexFileError(
                f"{path / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d} but "
                f"{META_FILE} says {len(ids)} of dim {meta['dim']}; rebuild the index"
            )
        known = {f.name for f in fields(BuildStats)}
        stats = BuildStats(**{k: v for k, v in meta.get("build", {}).items() if k in known})
        return cls(index, ids, meta["factory"], meta["metric"], meta["fingerprint"], stats, device)

    # ------------------------------------------------------------------ internals

    def _to_device(self, index: faiss.Index, device: str) -> faiss.Index:
        gpu = _parse_device(device)
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
        rows = np.random.default_rng(seed).choice(len(x), size=size, replace=False)
        try:
            self._index.train(x[np.sort(rows)])
        except RuntimeError as err:  # e.g. fewer training points than IVF lists
            raise UserInputError(
                f"cannot train {self.factory!r} on {size} vectors ({err}); use a smaller "
                "index (fewer IVF lists) or factory='auto'"
            ) from err

    def _tune(
        self,
        x: np.ndarray,
        knob: tuple[str, int],
        target_recall: float,
        seed: int,
        tuning_queries: np.ndarray | None,
    ) -> None:
        """Pick the smallest nprobe / efSearch reaching ``target_recall`` recall@10."""
        name, max_value = knob
        on_gpu = self._gpu_resources is not None
        if on_gpu:
            max_value = min(max_value, GPU_MAX_K)  # GPU IVF kernels cap nprobe like k
        queries, truth, self_rows = _tuning_set(x, self.metric, seed, tuning_queries)

        def recall(value: int) -> float:
            _apply_params(self._index, {name: value}, on_gpu)
            return _recall_at_k(self._index, queries, truth, self_rows)

        value, measured = _smallest_reaching(recall, _start_value(name), max_value, target_recall)
        _apply_params(self._index, {name: value}, on_gpu)
        self.stats.search_params = {name: value}
        self.stats.target_recall = target_recall
        self.stats.measured_recall = round(measured, 4)
        self.stats.tune_queries = len(queries)
        if measured < target_recall:
            log.warning(
                "%s reaches recall@10 %.3f < target %.3f at %s=%d (compression limits recall)",
                self.factory,
                measured,
                target_recall,
                name,
                value,
            )

    def _write_files(self, directory: Path) -> None:
        index_path = directory / INDEX_FILE
        faiss.write_index(self._cpu_index(), str(index_path))
        _fsync_file(index_path)
        ids_bytes = "".join(f"{i}\n" for i in self._ids).encode("utf-8")
        _write_bytes(directory / IDS_FILE, ids_bytes)
        meta = {
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "metric": self.metric,
            "dim": self.dim,
            "count": len(self._ids),
            "fingerprint": self.fingerprint,
            "search_params": self.stats.search_params,
            "build": asdict(self.stats),
            "files": {
                INDEX_FILE: _file_digest(index_path),
                IDS_FILE: {
                    "bytes": len(ids_bytes),
                    "sha256": hashlib.sha256(ids_bytes).hexdigest(),
                },
            },
        }
        _write_bytes(directory / META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
        _fsync_dir(directory)


# ---------------------------------------------------------------------- factory selection


def choose_factory(
    n: int, dim: int, memory_budget_bytes: int | None = None, device: str = "cpu"
) -> str:
    """Pick a FAISS factory string for ``n`` vectors of dimension ``dim``.

    * raw float32 vectors fit the budget: ``Flat`` (exact) up to ``FLAT_MAX_N`` vectors, then
      ``HNSW32`` up to ``HNSW_MAX_N`` on CPU (+~280 B/vector of graph links), else
      ``IVF{nlist},Flat``;
    * otherwise compressed codes, the most accurate that fits: ``SQ8`` (dim bytes/vector),
      ``SQ4`` (dim/2), then ``PQ{m}np`` (m bytes, no polysemous training, at least 8 dims per sub-quantizer because
      smaller ones train slowly and gain little), behind ``IVF{nlist}`` for large corpora.

    Raises:
        UserInputError: if even the smallest PQ code does not fit the budget.
    """
    if n < 1 or dim < 1:
        raise UserInputError(f"cannot index {n} vectors of dimension {dim}")
    budget = math.inf if memory_budget_bytes is None else float(memory_budget_bytes)
    small = n <= FLAT_MAX_N
    nlist = _nlist(n)
    # IVF lists store an 8-byte id per vector; centroids cost nlist * dim floats
    overhead, id_bytes = (0.0, 0) if small else (4.0 * nlist * dim, 8)
    per_vector = (budget - overhead) / n - id_bytes
    if 4.0 * n * dim <= budget:
        if small:
            return "Flat"
        hnsw_bytes = n * (4.0 * dim + 2 * 32 * 4 * 1.1)
        if n <= HNSW_MAX_N and _parse_device(device) is None and hnsw_bytes <= budget:
            return "HNSW32"
    prefix = "" if small else f"IVF{nlist},"
    for bytes_per_vector, code in ((4 * dim, "Flat"), (dim, "SQ8"), (dim / 2, "SQ4")):
        if per_vector >= bytes_per_vector:
            return prefix + code
    # 8-bit PQ codebooks hold 256 centroids of every sub-vector: 256 * dim floats in all
    codebooks = 1024.0 * dim
    per_vector -= codebooks / n
    fits = [m for m in _divisors(dim) if m <= per_vector and dim // m >= 8]
    if not fits:
        need = overhead + codebooks + n * (id_bytes + 1)
        raise UserInputError(
            f"memory budget {memory_budget_bytes} bytes is too small for {n} vectors of dim "
            f"{dim}; need at least {int(need)} bytes"
        )
    return f"{prefix}PQ{max(fits)}np"


def _nlist(n: int) -> int:
    """Inverted lists: a power of two near 2*sqrt(n), at least ~40 training points per list."""
    target = max(16, min(2 * math.sqrt(n), n / 40))
    return 2 ** max(4, round(math.log2(target)))


def _divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def _train_size(index: faiss.Index) -> int:
    """Training sample size: ``TRAIN_POINTS_PER_LIST`` per IVF list, else 64k (PQ/PCA/SQ)."""
    try:
        return TRAIN_POINTS_PER_LIST * faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 65_536


# ---------------------------------------------------------------------- tuning


def _tunable_param(index: faiss.Index) -> tuple[str, int] | None:
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


def _apply_params(index: faiss.Index, params: dict[str, int], on_gpu: bool) -> None:
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tuning_set(
    x: np.ndarray, metric: str, seed: int, queries: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tuning queries, their exact top-k, and the corpus row each query must not count.

    Without user queries this is leave-one-out: sampled corpus vectors are the queries and
    each one's own row is dropped from both exact and approximate results, so every query
    behaves like a fresh held-out sample from the corpus distribution. Perturbing corpus
    points instead would overstate recall (their neighbourhood is the source's neighbourhood).
    """
    if queries is None:
        rows = np.random.default_rng(seed + 1).choice(
            len(x), size=min(TUNE_QUERIES, len(x)), replace=False
        )
        queries = x[np.sort(rows)]
        rows = np.sort(rows)
    else:
        rows = np.full(len(queries), -1, dtype=np.int64)
    k = min(TUNE_K, len(x) - int(rows[0] >= 0))
    _, truth = faiss.knn(queries, x, k + 1, metric=_METRICS[metric])
    return queries, _drop_rows(truth, rows, k), rows


def _drop_rows(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Per query, remove its own source row from ``labels`` and keep the first k."""
    out = np.full((len(labels), k), -1, dtype=np.int64)
    for i, (row, own) in enumerate(zip(labels, rows)):
        kept = row[row != own][:k]
        out[i, : len(kept)] = kept
    return out


def _recall_at_k(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, rows: np.ndarray
) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    k = truth.shape[1]
    _, found = index.search(queries, k + 1)
    found = _drop_rows(found, rows, k)
    valid = truth >= 0
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1) & valid
    return float(hits.sum() / max(1, valid.sum()))


def _smallest_reaching(recall: Any, low: int, high: int, target: float) -> tuple[int, float]:
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


# ---------------------------------------------------------------------- validation helpers


def _metric_name(metric: str) -> str:
    if metric not in _METRICS:
        raise UserInputError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    return metric


def _parse_device(device: str) -> int | None:
    """GPU number for ``cuda`` / ``cuda:N``, None for ``cpu``."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise UserInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _make_index(dim: int, factory: str, metric: str, seed: int) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, _METRICS[metric])
    except RuntimeError as err:
        raise UserInputError(
            f"invalid FAISS factory string {factory!r} for dim {dim}: {err}; use 'auto' or a "
            "string like 'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ32'"
        ) from err
    with contextlib.suppress(RuntimeError):  # not an IVF index: no k-means to seed
        faiss.extract_index_ivf(index).cp.seed = seed
    _disable_polysemous_training(index)
    return index


def _set_ef_construction(index: faiss.Index, value: int) -> None:
    inner = faiss.downcast_index(index)
    if not hasattr(inner, "hnsw"):
        raise UserInputError(f"ef_construction applies to HNSW indexes, not {type(inner).__name__}")
    if value < 1:
        raise UserInputError(f"ef_construction must be >= 1, got {value}")
    inner.hnsw.efConstruction = int(value)


def _disable_polysemous_training(index: faiss.Index) -> None:
    """Skip polysemous code training (on by default for factory PQ indexes).

    It only serves polysemous Hamming filtering, which this wrapper never enables, yet it
    takes 10-100x longer than training the PQ itself.
    """
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        inner = faiss.downcast_index(index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def _as_vectors(
    x: np.ndarray, name: str, dim: int | None = None, allow_single: bool = False
) -> np.ndarray:
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


def _check_ids(ids: Sequence[str], n: int, existing: Sequence[str]) -> list[str]:
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


# ---------------------------------------------------------------------- file helpers


def _backup_path(target: Path) -> Path:
    return target.parent / f".{target.name}.bak"


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty directory or a previous index."""
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target} exists and is not a directory; choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / META_FILE).exists():
        raise UserInputError(
            f"{target} is a non-empty directory without {META_FILE}; refusing to overwrite "
            "something that is not an index: choose an empty or new directory"
        )


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp``: the old index stays at a backup path until the swap."""
    backup = _backup_path(target)
    if target.exists():
        if backup.exists():
            shutil.rmtree(backup)  # stale backup from a crash after a completed swap
        os.rename(target, backup)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _resolve_dir(path: Path) -> Path:
    """The index directory, or its backup if a crash hit between the two renames of a save."""
    if (path / META_FILE).exists():
        return path
    backup = _backup_path(path)
    if not path.exists() and (backup / META_FILE).exists():
        log.warning("%s missing; loading the previous index from %s", path, backup)
        return backup
    if not path.is_dir():
        raise IndexFileError(
            f"index directory {path} does not exist; build it with `modalign index build`"
        )
    raise IndexFileError(
        f"{path / META_FILE} is missing: {path} is not a complete index; rebuild it with "
        "`modalign index build`"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
        for key in ("factory", "metric", "dim", "count", "fingerprint", "files"):
            if key not in meta:
                raise ValueError(f"missing key {key!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise IndexFileError(f"{path} is unreadable or corrupt ({err}); rebuild the index") from err
    return meta


def _check_fingerprint(path: Path, meta: dict[str, Any], expected: str | None) -> None:
    if expected is not None and meta["fingerprint"] != expected:
        raise IndexFingerprintError(
            f"index {path} was built by another model (fingerprint {meta['fingerprint']!r}, "
            f"expected {expected!r}); rebuild it with the current model or pass the matching "
            "model"
        )


def _verify_file(path: Path, meta: dict[str, Any]) -> None:
    expected = meta["files"].get(path.name)
    if not path.is_file():
        raise IndexFileError(f"{path} is missing; rebuild the index")
    if expected is None or _file_digest(path) != expected:
        raise IndexFileError(
            f"{path} is corrupt or truncated (size/checksum differ from {META_FILE}); "
            "rebuild the index"
        )


def _read_ids(path: Path, meta: dict[str, Any]) -> list[str]:
    _verify_file(path, meta)
    ids = path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(ids) != meta["count"]:
        raise IndexFileError(f"{path} has {len(ids)} ids, expected {meta['count']}; rebuild")
    return ids


def _read_index(path: Path, meta: dict[str, Any]) -> faiss.Index:
    _verify_file(path, meta)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexFileError(f"{path} cannot be read by FAISS ({err}); rebuild the index") from err


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_bytes(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # a directory fsync makes the renames / new entries durable
    _fsync_file(path)
