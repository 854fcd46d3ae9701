"""Training-loader throughput over several epochs with the decoded-item cache none/memory/disk.

    python scripts/bench_cache.py --manifest CORPUS/train.jsonl [--config demo] [--epochs 3]
        [--workers 0 2] [--cache none memory disk disk-warm] [--batch 128] [--input-size 32]
        [--set data.audio.sample_rate=16000 ...]

Reads the manifest through ``open_stream`` (the training path: decode + train-time augmentation
with the config's ``data`` section, image tower input ``--input-size``), ``--epochs`` epochs of
full batches, and prints items/s of the first epoch (cold: worker start-up and every decode
included) and of the later ones, the CPU time of this process per item (all of the loading
without workers, so it is less bent by other load on the machine than items/s; with workers
it is only collation and transfer), and the decode / cache-hit counts the batches carry. One uncached epoch runs first (imports,
transforms, the page cache) and is not reported.
``disk`` starts from an empty folder; ``disk-warm`` reuses the folder a ``disk`` row filled
(a second run over the same corpus). Make a demo corpus with ``modalign data build-demo``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def run(manifest: str, data_cfg: Any, cache: Any, workers: int, epochs: int, batch: int,
        size: int) -> dict[str, float]:  # fmt: skip
    """One stream over ``epochs`` epochs: items/s and counts, first epoch vs the rest."""
    from modalign.data.batch import DecodeCounts
    from modalign.data.modality import ImagePreset, modality_specs
    from modalign.data.sources import open_stream

    specs = modality_specs(["image", "audio", "text"], data_cfg, {"image": ImagePreset(size)})
    stream = open_stream(manifest, specs, batch, num_workers=workers, cache=cache,
                         prefetch_factor=data_cfg.prefetch_factor)  # fmt: skip
    per_epoch = stream.per_epoch
    it = iter(stream)
    out: dict[str, float] = {}
    for phase, batches in (("first", per_epoch), ("later", per_epoch * (epochs - 1))):
        counts, items = DecodeCounts(), 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            b = next(it)
            items += len(b)
            counts.add(b.counts)
        seconds = time.perf_counter() - start
        out[f"{phase}_rate"] = items / seconds if batches else float("nan")
        out[f"{phase}_cpu_ms"] = 1e3 * (time.process_time() - cpu) / max(items, 1)
        out[f"{phase}_decoded"], out[f"{phase}_hits"] = counts.decoded, counts.cache_hits
    del it
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--config", default="demo", help="config whose data section is used")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", nargs="+", default=["none", "memory", "disk", "disk-warm"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (data.audio...)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from modalign.config import load_config
    from modalign.data.cache import open_cache
    from modalign.data.config import cache_spec

    data_cfg = load_config(args.config, [f"data.prefetch_factor={args.prefetch}", *args.set]).data
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{args.manifest}, config {args.config} {' '.join(args.set)}, batch {args.batch}, "
          f"{args.epochs} epochs, prefetch {args.prefetch}\n")  # fmt: skip
    print("| cache | workers | epoch 1 items/s | epochs 2+ items/s | epoch 1 CPU ms/item | "
          "epochs 2+ CPU ms/item | epoch 1 decodes | epochs 2+ decodes | epochs 2+ hits |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    run(args.manifest, data_cfg, None, 0, 1, args.batch, args.input_size)  # imports, page cache
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for w in args.workers:
            folder = Path(tmp) / f"w{w}"
            for kind in args.cache:
                opts = {"dir": str(folder)} if kind.startswith("disk") else {}
                spec = cache_spec({"kind": kind.removesuffix("-warm"), "options": opts})
                r = run(args.manifest, data_cfg, open_cache(spec), w, args.epochs, args.batch,
                        args.input_size)  # fmt: skip
                print(f"| {kind} | {w} | {r['first_rate']:.0f} | {r['later_rate']:.0f} | "
                      f"{r['first_cpu_ms']:.2f} | {r['later_cpu_ms']:.2f} | "
                      f"{r['first_decoded']:.0f} | {r['later_decoded']:.0f} | "
                      f"{r['later_hits']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
