#!/usr/bin/env python
"""Benchmark retrieval_metrics: wall time and peak memory on a large query x gallery set.

Class-level retrieval (100 classes) of ``--n`` queries against ``--n`` gallery items. Peak RSS
is read from ``resource.getrusage`` before and after evaluation to show that memory stays
bounded by one ``chunk_size x N`` score block, far below the full ``Q x N`` score matrix.

    python scripts/bench_retrieval_eval.py                  # 100k x 100k, dim 384
    python scripts/bench_retrieval_eval.py --n 20000 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from modalign.retrieval.metrics import retrieval_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="queries and gallery items")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--noise", type=float, default=3.0, help="noise norm relative to centres")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p.parse_args(argv)


def make_split(
    rng: np.random.Generator, centres: np.ndarray, n: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around class centres (made in blocks to keep temporaries small)."""
    labels = rng.integers(0, len(centres), n)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for s in range(0, n, 50_000):
        block = centres[labels[s : s + 50_000]] + rng.standard_normal(
            (len(labels[s : s + 50_000]), centres.shape[1]), dtype=np.float32
        ) * (noise / np.sqrt(centres.shape[1]))
        out[s : s + 50_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, labels


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries, q_labels = make_split(rng, centres, args.n, args.noise)
    gallery, g_labels = make_split(rng, centres, args.n, args.noise)
    before = peak_rss_mb()
    start = time.perf_counter()
    metrics = retrieval_metrics(queries, gallery, q_labels, g_labels, chunk_size=args.chunk_size)
    wall = time.perf_counter() - start
    after = peak_rss_mb()
    report = {
        "n_queries": args.n,
        "n_gallery": args.n,
        "dim": args.dim,
        "chunk_size": args.chunk_size,
        "wall_s": round(wall, 1),
        "queries_per_s": round(args.n / wall),
        "peak_rss_mb_before_eval": round(before),
        "peak_rss_mb_after_eval": round(after),
        "eval_extra_mb": round(after - before),
        "full_score_matrix_mb": round(args.n * args.n * 4 / 2**20),
        "chunk_scores_mb": round(args.chunk_size * args.n * 4 / 2**20),
        "metrics": metrics.to_dict(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"| {'quantity':<26} | value |\n|---|---:|")
        for key, value in report.items():
            if key != "metrics":
                print(f"| {key:<26} | {value} |")
        print("\nmetrics:", json.dumps(metrics.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
