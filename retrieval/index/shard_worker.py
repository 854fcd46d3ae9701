"""One shard process of a sharded index build (:mod:`~modalign.retrieval.index.sharded`).

Run as a script (``python -I shard_worker.py``), never imported by the build: it imports only
FAISS and NumPy, so each shard process's peak memory is its part of the index, not the ~600 MB
that importing the package (and torch through it) would add. It reads one JSON job on stdin::

    {"trained": "trained.faiss", "target": "shard-00000.faiss", "files": [...npy...],
     "sizes": [...rows per file...], "lo": 0, "hi": 5000, "threads": 1, "chunk_rows": 65536}

adds the global rows ``[lo, hi)`` (memory-mapped from the ``.npy`` files ``chunk_rows`` at a
time, FAISS ids = global row numbers) to the trained empty index, writes it to ``target``
(``target.partial`` then ``os.replace``) and prints ``{"rows", "seconds", "max_rss_bytes"}``
as one JSON line. ``max_rss_bytes`` is this process's own peak resident memory (``VmHWM``):
``ru_maxrss`` as seen by the parent would also count the parent's pages from before ``exec``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import faiss
import numpy as np


def add_rows(index: Any, files: list[str], sizes: list[int], lo: int, hi: int, chunk: int) -> int:
    """Add global rows ``[lo, hi)`` of the row-aligned ``files`` to ``index``; rows added."""
    first, added = 0, 0
    for path, size in zip(files, sizes):
        a, b = max(lo, first), min(hi, first + size)
        if a < b:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            for c in range(a, b, chunk):
                d = min(b, c + chunk)
                x = np.ascontiguousarray(mapped[c - first : d - first], dtype=np.float32)
                index.add_with_ids(x, np.arange(c, d, dtype=np.int64))
                added += d - c
            del mapped  # unmapped: its pages leave this process
        first += size
    return added


def main() -> int:
    """Run the job read from stdin; exit status 0 once the shard file is in place."""
    job = json.load(sys.stdin)
    start = time.perf_counter()
    faiss.omp_set_num_threads(int(job["threads"]))
    index = faiss.read_index(job["trained"])
    rows = add_rows(
        index, job["files"], job["sizes"], int(job["lo"]), int(job["hi"]), int(job["chunk_rows"])
    )
    partial = job["target"] + ".partial"
    faiss.write_index(index, partial)
    os.replace(partial, job["target"])
    seconds = round(time.perf_counter() - start, 3)
    print(json.dumps({"rows": rows, "seconds": seconds, "max_rss_bytes": peak_rss_bytes()}))
    return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since ``exec`` (Linux ``VmHWM``; else ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(ln for ln in fh if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


if __name__ == "__main__":
    sys.exit(main())
