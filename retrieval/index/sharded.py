"""Sharded index build: one trained quantizer, N IVF shards built in parallel processes, merged
into one on-disk IVF index (``modalign index build --embeddings DIR --shards N``).

How it works (FAISS's own machinery throughout, as in FAISS's ``demo_ondisk_ivf.py``):

1. the parent trains the IVF index ONCE, on the same sample rows an unsharded build picks
   (:func:`~modalign.retrieval.index.train_rows`), and writes the empty trained index;
2. N processes (:mod:`~modalign.retrieval.index.shard_worker`, a script importing only FAISS
   and NumPy) each read that trained index and add only their contiguous row range
   ``[lo, hi)``, memory-mapped from the embedding ``.npy`` files chunk by chunk, with the global
   row numbers as FAISS ids (``add_with_ids``); each writes its shard (``os.replace``); the
   parent records each one's rows, time and peak RSS (the child's own ``VmHWM``);
3. the parent merges the shards' inverted lists into one ``faiss.OnDiskInvertedLists`` file,
   ``index.ivfdata`` (:func:`merge_shards`: ``merge_ondisk``'s steps, with the shard maps
   released afterwards); the shard files are then deleted;
4. nprobe is tuned on the merged index exactly as for an unsharded chunked build.

Exactness: every list of the merged index holds shard 0's entries, then shard 1's..., i.e.
its rows in global row order, exactly as the same trained index fed all rows in order holds
them. So for any IVF index with per-vector codes (``IVF*,Flat``, ``IVF*,SQ*``, ``IVF*,PQ*``; not
``IVFPQR`` refinement, which FAISS cannot merge on disk) and the same nprobe, a search returns
the same ids with bitwise the same distances, ties in the same order, as the unsharded build
(:func:`~modalign.retrieval.index.chunked.build_chunked` with the same options trains the same
quantizer from the same sample).

Searching and serving need nothing special: the merged index is one FAISS index file whose
lists are memory-mapped from ``index.ivfdata`` (loaded with ``IO_FLAG_ONDISK_SAME_DIR``, after
both files are checked against the sha256 in ``index.json``), so its resident memory is what the
page cache keeps, not the corpus.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from modalign.core.errors import UserInputError
from modalign.retrieval.index import BuildStats, VectorIndex, as_vectors, check_ids, train_rows
from modalign.retrieval.index.chunked import ShardVectors, chunked_tuning_set
from modalign.retrieval.index.factory import make_index, train_size
from modalign.retrieval.index.options import IndexBuildOptions
from modalign.retrieval.index.store import ONDISK_FILE, quiet_c_stdout, write_files
from modalign.retrieval.index.tuning import tunable_param

__all__ = ["ADD_CHUNK_ROWS", "build_sharded", "merge_shards", "shard_ranges"]

# rows read and added at a time by a shard process (bounds its transient float32 copy)
ADD_CHUNK_ROWS = 65_536
_WORK = ".shards"
WORKER = Path(__file__).with_name("shard_worker.py")


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ``[lo, hi)`` row ranges covering ``range(n)``."""
    if shards < 1:
        raise UserInputError(f"--shards must be >= 1, got {shards}")
    if shards > n:
        raise UserInputError(f"--shards {shards} exceeds the {n} vectors to index; use fewer")
    bounds = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def build_sharded(
    vectors: ShardVectors,
    ids: Sequence[str],
    out: Path,
    shards: int,
    options: IndexBuildOptions | None = None,
    *,
    fingerprint: str = "",
    tuning_queries: np.ndarray | None = None,
) -> VectorIndex:
    """Build an IVF index over ``vectors`` with ``shards`` processes into directory ``out``.

    ``out`` is a fresh staging directory (the caller's :func:`~modalign.core.artifact.atomic_dir`
    swaps it in): it receives ``index.faiss``, ``index.ivfdata``, ``ids.txt`` and ``index.json``
    (the same layout :meth:`VectorIndex.load` reads). Returns the loaded on-disk index, its
    ``stats.shards`` holding each shard process's rows, seconds and peak RSS.

    Raises:
        UserInputError: a factory that is not IVF, a GPU device, more shards than vectors.
    """
    opts = options or IndexBuildOptions()
    n, dim = vectors.n, vectors.dim
    ranges = shard_ranges(n, shards)
    id_list = check_ids(ids, n, existing=())
    if opts.device != "cpu":
        raise UserInputError("a sharded build runs on CPU processes; use --device cpu")
    tq = None if tuning_queries is None else as_vectors(tuning_queries, "tuning_queries", dim)
    factory = opts.factory_for(n, dim)
    cpu_index = make_index(dim, factory, opts.metric, opts.seed)
    _check_ivf(cpu_index, factory)
    start = time.perf_counter()
    trained = VectorIndex(cpu_index, [], factory, opts.metric, fingerprint, BuildStats())
    stats = trained.stats
    stats.train_size = min(n, train_size(cpu_index))
    t = time.perf_counter()
    trained.train_on(vectors.take(train_rows(n, stats.train_size, opts.seed)))
    stats.train_seconds = time.perf_counter() - t

    work = Path(out).parent / f"{_WORK}-{Path(out).name}"
    work.mkdir(parents=True, exist_ok=True)
    try:  # the shard files are scratch: gone after the merge, or after a failure
        trained_file = work / "trained.faiss"
        faiss.write_index(cpu_index, str(trained_file))
        t = time.perf_counter()
        stats.shards = _run_shards(vectors, ranges, trained_file, work)
        stats.add_seconds = time.perf_counter() - t
        Path(out).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        merged = faiss.read_index(str(trained_file))
        shard_files = [work / f"shard-{i:05d}.faiss" for i in range(len(ranges))]
        merge_shards(merged, shard_files, Path(out) / ONDISK_FILE)
        stats.merge_seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)

    built = VectorIndex(merged, id_list, factory, opts.metric, fingerprint, stats)
    knob = tunable_param(merged)
    if knob is not None and n > 1:
        t = time.perf_counter()
        tset = chunked_tuning_set(vectors, opts.metric, opts.seed, tq)
        built.tune_with(tset, knob, opts.target_recall)
        stats.tune_seconds = time.perf_counter() - t
    stats.build_seconds = time.perf_counter() - start
    write_files(Path(out), merged, id_list, built.manifest(), data_files=(ONDISK_FILE,))
    return built


def merge_shards(trained: faiss.Index, shard_files: Sequence[Path], target: Path) -> None:
    """Move the inverted lists of ``shard_files`` (in order) into ``trained`` as one
    ``faiss.OnDiskInvertedLists`` file ``target``.

    The steps of :func:`faiss.contrib.ondisk.merge_ondisk` (memory-mapped shards,
    ``OnDiskInvertedLists.merge_from_multiple``, ``replace_invlists``), except that the shard
    indexes keep owning their lists and are released afterwards: ``merge_ondisk`` disowns them,
    so their maps (and the disk space of the deleted shard files) stay until the process ends.
    """
    shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in shard_files]
    ivf = faiss.extract_index_ivf(trained)
    if ivf.ntotal != 0:
        raise ValueError("merge_shards needs the empty trained index")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(target))
    sources = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # faiss .pyi omits it
    for shard in shards:
        sources.push_back(faiss.extract_index_ivf(shard).invlists)
    with quiet_c_stdout():  # FAISS prints "resizing ..." to stdout
        ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False)
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)  # the index owns (and frees) the on-disk lists
    lists.this.disown()  # type: ignore[attr-defined]  # SWIG ownership: now the index's
    del sources, shards  # the shard maps are released here


def _check_ivf(index: faiss.Index, factory: str) -> None:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        raise UserInputError(
            f"--shards needs an IVF factory (e.g. 'IVF1024,Flat' or 'IVF1024,PQ32'), got "
            f"{factory!r}; pass --factory IVF...,... (auto picks non-IVF types for small corpora)"
        ) from None
    if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQR):
        raise UserInputError(f"--shards cannot merge {factory!r} (IVFPQR); use IVF*,PQ*")


def _run_shards(
    vectors: ShardVectors, ranges: list[tuple[int, int]], trained: Path, work: Path
) -> list[dict[str, Any]]:
    """Build every shard in its own process, all at once; returns their reports in order."""
    threads = max(1, (os.cpu_count() or 1) // len(ranges))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for i, (lo, hi) in enumerate(ranges):
            job = {
                "trained": str(trained), "target": str(work / f"shard-{i:05d}.faiss"),
                "files": [str(f) for f in vectors.files], "sizes": vectors.sizes,
                "lo": lo, "hi": hi, "threads": threads, "chunk_rows": ADD_CHUNK_ROWS,
            }  # fmt: skip
            log_file = work / f"shard-{i:05d}.log"
            with log_file.open("wb") as out:  # the child keeps its own descriptor
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(WORKER)],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
            procs.append((proc, log_file))
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        return [_reap(i, proc, log_file) for i, (proc, log_file) in enumerate(procs)]
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def _reap(shard: int, proc: subprocess.Popen[bytes], log_file: Path) -> dict[str, Any]:
    """Wait for one shard process and return its report (rows, seconds, peak RSS)."""
    proc.wait()
    text = log_file.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"shard process {shard} failed (exit status {proc.returncode}); the index was not "
            f"replaced. Its output:\n{text[-2000:]}"
        )
    report = json.loads(text.strip().splitlines()[-1])
    log_file.unlink()
    return {"shard": shard, **report}
