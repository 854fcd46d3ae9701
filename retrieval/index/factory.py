"""Which FAISS index to build: ``factory="auto"`` selection and index construction.

``choose_factory`` picks the index type from corpus size, dimension and memory budget (in the
spirit of autofaiss): exact ``Flat`` for small corpora, ``HNSW32`` for medium ones, ``IVF*,Flat``
for large ones and ``IVF*,SQ8`` / ``IVF*,PQ*`` when the raw vectors do not fit the budget.
"""

from __future__ import annotations

import contextlib
import math
from types import MappingProxyType

import faiss

from modalign.core.errors import UserInputError

__all__ = ["METRICS", "choose_factory", "make_index", "metric_name", "nlist_for", "parse_device"]

METRICS = MappingProxyType({"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2})
# Below this many vectors exact search is fast enough that approximation buys nothing.
FLAT_MAX_N = 50_000
# HNSW build time grows superlinearly and it cannot run on GPU; above this IVF builds faster.
HNSW_MAX_N = 500_000
# k-means cost is linear in the sample; FAISS asks for 39..256 points per centroid and 64 gives
# nearly the same lists as 256 at a quarter of the training time.
TRAIN_POINTS_PER_LIST = 64


def choose_factory(
    n: int, dim: int, memory_budget_bytes: int | None = None, device: str = "cpu"
) -> str:
    """Pick a FAISS factory string for ``n`` vectors of dimension ``dim``.

    * raw float32 vectors fit the budget: ``Flat`` (exact) up to ``FLAT_MAX_N`` vectors, then
      ``HNSW32`` up to ``HNSW_MAX_N`` on CPU (+~280 B/vector of graph links), else
      ``IVF{nlist},Flat``;
    * otherwise compressed codes, the most accurate that fits: ``SQ8`` (dim bytes/vector),
      ``SQ4`` (dim/2), then ``PQ{m}np`` (m bytes, no polysemous training, at least 8 dims per
      sub-quantizer because smaller ones train slowly and gain little), behind ``IVF{nlist}``
      for large corpora.

    Raises:
        UserInputError: if even the smallest PQ code does not fit the budget.
    """
    if n < 1 or dim < 1:
        raise UserInputError(f"cannot index {n} vectors of dimension {dim}")
    budget = math.inf if memory_budget_bytes is None else float(memory_budget_bytes)
    small = n <= FLAT_MAX_N
    nlist = nlist_for(n)
    # IVF lists store an 8-byte id per vector; centroids cost nlist * dim floats
    overhead, id_bytes = (0.0, 0) if small else (4.0 * nlist * dim, 8)
    per_vector = (budget - overhead) / n - id_bytes
    if 4.0 * n * dim <= budget:
        if small:
            return "Flat"
        hnsw_bytes = n * (4.0 * dim + 2 * 32 * 4 * 1.1)
        if n <= HNSW_MAX_N and parse_device(device) is None and hnsw_bytes <= budget:
            return "HNSW32"
    prefix = "" if small else f"IVF{nlist},"
    # Measured at 0.3x Flat's bytes (scripts/bench_index.py, 1M x 384): IVF2048,SQ8 tops out at
    # recall@10 0.984 and tunes to 0.96 at nprobe 15; IVF2048,PQ48x4fs,Refine(SQ8) (0.27x)
    # reaches only 0.60 at k_factor 8, its 4-bit first stage being too coarse to refine from.
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


def nlist_for(n: int) -> int:
    """Inverted lists: a power of two near 2*sqrt(n), at least ~40 training points per list."""
    target = max(16, min(2 * math.sqrt(n), n / 40))
    return 2 ** max(4, round(math.log2(target)))


def _divisors(dim: int) -> list[int]:
    return [m for m in range(1, dim + 1) if dim % m == 0]


def train_size(index: faiss.Index) -> int:
    """Training sample size: ``TRAIN_POINTS_PER_LIST`` per IVF list, else 64k (PQ/PCA/SQ)."""
    try:
        return TRAIN_POINTS_PER_LIST * faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 65_536


def metric_name(metric: str) -> str:
    """``metric`` itself if it is a known metric name, else a UserInputError listing them."""
    if metric not in METRICS:
        raise UserInputError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return metric


def parse_device(device: str) -> int | None:
    """GPU number for ``cuda`` / ``cuda:N``, None for ``cpu``."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise UserInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def make_index(dim: int, factory: str, metric: str, seed: int) -> faiss.Index:
    """An empty CPU index from a factory string (k-means seeded, no polysemous training)."""
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as err:
        raise UserInputError(
            f"invalid FAISS factory string {factory!r} for dim {dim}: {err}; use 'auto' or a "
            "string like 'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ32'"
        ) from err
    with contextlib.suppress(RuntimeError):  # not an IVF index: no k-means to seed
        faiss.extract_index_ivf(index).cp.seed = seed
    _disable_polysemous_training(index)
    return index


def set_ef_construction(index: faiss.Index, value: int) -> None:
    """Set the HNSW build-time beam width; a UserInputError for any other index type."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexHNSW):
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
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        inner.do_polysemous_training = False  # type: ignore[union-attr]  # faiss .pyi omits it
