"""Feeding the step loop: the next micro-batches, on the device, every modality filled in."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

from modalign.core.errors import DataError
from modalign.data.dataset import BadItemLog, Batch
from modalign.data.modality import ModalitySpec
from modalign.pretrain.distributed import all_reduce_min

log = logging.getLogger(__name__)

# Consecutive batches with no rows on some process before the data is declared unusable.
MAX_EMPTY_BATCHES = 100


def next_micro_batches(
    batches: Iterator[Batch],
    specs: Mapping[str, ModalitySpec],
    accum_steps: int,
    device: torch.device,
    bad: BadItemLog,
    source: str | Mapping[str, float],  # data.train: SRC or a {SRC: weight} mix
) -> list[Batch]:
    """The next ``accum_steps`` micro-batches, on the device, every modality filled in.

    Data loading runs outside the training RNG (DataLoader iterators draw a seed from the global
    torch generator), so a resumed run sees the same dropout masks as an uninterrupted one.
    Batches that leave some process without rows (every item bad) are skipped on all processes.
    """
    mods = list(specs)
    for _ in range(MAX_EMPTY_BATCHES):
        with torch.random.fork_rng(devices=[]):
            micro = [next(batches) for _ in range(accum_steps)]
        for b in micro:
            bad.add(b.bad)
        rows = min(len(b) for b in micro)
        if all_reduce_min(rows, device) > 0:
            return [b.with_absent(specs, mods).to(device) for b in micro]
        log.warning("skipping a batch with no usable rows on some process")
    raise DataError(
        f"{source}: {MAX_EMPTY_BATCHES} batches in a row had no usable rows; "
        f"check the data ({bad.summary()})"
    )
