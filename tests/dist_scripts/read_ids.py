"""Run under ``torchrun --nproc_per_node 2``: record the item ids each rank reads in one epoch.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/dist_scripts/read_ids.py MANIFEST SHARDS OUT``.
Writes ``OUT/{manifest,shards}-rank{R}.json`` (a list of ids) for the test to check.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from modalign.data.config import DataConfig
from modalign.data.modality import default_modalities
from modalign.data.sources import open_source, open_stream
from modalign.data.stream import SourceStream


def main(manifest: str, shards: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    specs = {"text": default_modalities(DataConfig())["text"]}
    # Manifest: the training stream; one epoch = per_epoch global batches split over ranks.
    stream = open_stream(manifest, specs, batch_size=3, seed=7)
    batches = list(itertools.islice(iter(stream), stream.per_epoch))
    ids = [i for b in batches for i in b.ids]
    (out / f"manifest-rank{rank}.json").write_text(json.dumps(ids))
    # Shards: 2 DataLoader workers per rank, keep partial batches so nothing is dropped.
    source = open_source(shards, specs, train=True, seed=7)
    shard_stream = SourceStream(source, 4, num_workers=2, drop_last=False)
    per_epoch = sum(shard_stream._batches(c) for c in source.counts(2))
    batches = list(itertools.islice(iter(shard_stream), per_epoch))
    ids = [i for b in batches for i in b.ids]
    (out / f"shards-rank{rank}.json").write_text(json.dumps(ids))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
