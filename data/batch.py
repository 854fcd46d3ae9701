"""Typed samples and batches, and the bad-item records they carry.

A :class:`Sample` is one decoded row (from a manifest row or a shard record, built by
:func:`modalign.data.sample.decode_sample`); :class:`Collate` turns samples into a
:class:`Batch`: ``inputs`` by modality, ``present`` masks, ``ids``, ``labels``, ``index`` and the
``bad`` records. Modality names live only in ``inputs``/``present``, so no modality can clobber
the ids or masks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # only for annotations: modality imports nothing from here
    from modalign.data.modality import ModalitySpec

log = logging.getLogger(__name__)


@dataclass
class BadRecord:
    """One unusable item: where (``<manifest>:<line>`` or ``<shard>#<key>``), which modality, why."""

    item: str
    modality: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.item} [{self.modality}] {self.reason}{detail}"


@dataclass
class BadItemLog:
    """Counts of skipped items by reason, with the first few examples; warnings rate-limited."""

    max_examples: int = 5
    max_warnings: int = 10
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    _warned: int = 0

    def add(self, records: Sequence[BadRecord]) -> None:
        for rec in records:
            self.counts[rec.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(str(rec))
            if self._warned < self.max_warnings:
                self._warned += 1
                last = self._warned == self.max_warnings
                suffix = " (further bad items are only counted)" if last else ""
                log.warning("skipping bad item: %s%s", rec, suffix)

    def add_counts(self, counts: Mapping[str, int], examples: Sequence[str] = ()) -> None:
        self.counts.update(counts)
        self.examples.extend(list(examples)[: max(0, self.max_examples - len(self.examples))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no bad items"
        reasons = ", ".join(f"{k}={v}" for k, v in self.counts.most_common())
        first = "; ".join(self.examples)
        return f"{self.total} bad items skipped ({reasons}); first: {first}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bad": self.total,
            "bad_by_reason": dict(self.counts),
            "examples": list(self.examples),
        }


@dataclass
class DecodeCounts:
    """What building samples cost: decodes from the item's bytes and decoded-item cache
    outcomes (:mod:`modalign.data.cache`). Summed per batch, so workers' figures reach the run."""

    decoded: int = 0  # file/bytes values decoded (load or prepare); inline text is not counted
    cache_hits: int = 0  # values taken from the cache (augment only)
    cache_corrupt: int = 0  # unreadable disk entries (truncated, torn, edited): decoded again
    cache_full: int = 0  # decoded values not kept: the cache reached max_bytes
    cache_write_errors: int = 0  # disk entries that could not be written (disk full, ...)

    def add(self, other: DecodeCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Sample:
    """One decoded row: ``values`` by modality (only those that decoded), plus its bad records."""

    id: str
    label: str | None
    index: int
    values: dict[str, Any] = field(default_factory=dict)
    bad: list[BadRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # other fields (a shard's json)
    key: int = 0  # augmentation key from (seed, epoch, item): see modalign.data.item_keys
    counts: DecodeCounts = field(default_factory=DecodeCounts)


@dataclass
class Batch:
    """A batch: ``inputs[m]`` (tensor or list) and ``present[m]`` (bool per row) by modality.

    Only modalities with at least one present row appear, unless filled by :meth:`with_absent`.
    ``bad`` holds the bad records of the samples that went into the batch (rows dropped for
    having no usable modality included).
    """

    inputs: dict[str, Any]
    present: dict[str, torch.Tensor]
    ids: list[str]
    labels: list[str | None]
    index: torch.Tensor
    bad: list[BadRecord] = field(default_factory=list)
    # One augmentation key per row (long): model-side augmentations draw from these
    # (modalign.data.item_keys), so results do not depend on how rows are split over processes.
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    counts: DecodeCounts = field(default_factory=DecodeCounts)  # what decoding the batch cost
    # Outputs a loader-side batch hook already computed for some modalities (e.g. a frozen
    # tower's trunk features, see modalign.pretrain.towers.in_loader): modality -> (B, ...) tensor.
    encoded: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """A copy with tensors (inputs, masks) on ``device``; lists (text) stay as they are."""
        inputs = {
            m: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for m, v in self.inputs.items()
        }
        present = {m: p.to(device, non_blocking=non_blocking) for m, p in self.present.items()}
        encoded = {m: e.to(device, non_blocking=non_blocking) for m, e in self.encoded.items()}
        return replace(self, inputs=inputs, present=present, encoded=encoded)

    def with_absent(
        self, specs: Mapping[str, ModalitySpec], names: Sequence[str] | None = None
    ) -> Batch:
        """A copy where every modality in ``names`` (default: ``specs``) has an entry: missing
        ones get placeholders and all-False masks, so every process runs the same graph."""
        inputs, present = dict(self.inputs), dict(self.present)
        for m in names if names is not None else list(specs):
            if m not in inputs:
                inputs[m] = specs[m].absent(len(self))
                present[m] = torch.zeros(len(self), dtype=torch.bool)
        return replace(self, inputs=inputs, present=present)

    def select(self, names: Sequence[str]) -> Batch:
        """A copy keeping only the modalities in ``names``."""
        keep = [m for m in names if m in self.inputs]
        return replace(
            self,
            inputs={m: self.inputs[m] for m in keep},
            present={m: self.present[m] for m in keep},
            encoded={m: e for m, e in self.encoded.items() if m in keep},
        )


BatchHook = Callable[[Batch], Batch]
"""A function applied to every collated batch inside the loader (in its worker processes)."""


class HookedCollate:
    """``hook(collate(samples))``: runs in the DataLoader workers, overlapped with the step.

    Both parts must be picklable when workers start by spawn/forkserver (they are forked on
    Linux by default).
    """

    def __init__(self, collate: Callable[[Sequence[Sample]], Batch], hook: BatchHook) -> None:
        self.collate, self.hook = collate, hook

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        return self.hook(self.collate(samples))


def make_collate(
    modalities: Mapping[str, ModalitySpec], keep_empty: bool = False, hook: BatchHook | None = None
) -> Callable[[Sequence[Sample]], Batch]:
    """The DataLoader ``collate_fn``: :class:`Collate`, then ``hook`` when one is given."""
    collate = Collate(modalities, keep_empty=keep_empty)
    return collate if hook is None else HookedCollate(collate, hook)


class Collate:
    """List of samples -> :class:`Batch` with stacked tensors and ``present`` masks.

    Samples left with no modality after decoding are dropped (their bad records are kept),
    unless ``keep_empty``: then they stay as all-absent rows so every batch keeps its size.
    Training streams need that: the cross-process all-gather requires equal batch sizes on every
    rank, and the losses ignore rows whose ``present`` bits are all False.
    """

    def __init__(self, modalities: Mapping[str, ModalitySpec], keep_empty: bool = False) -> None:
        self.modalities = dict(modalities)
        self.keep_empty = keep_empty

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        bad = [rec for s in samples for rec in s.bad]
        kept = [
            s for s in samples if self.keep_empty or any(m in s.values for m in self.modalities)
        ]
        inputs: dict[str, Any] = {}
        present: dict[str, torch.Tensor] = {}
        for name, spec in self.modalities.items():
            mask = [name in s.values for s in kept]
            if not any(mask):
                continue
            inputs[name] = spec.collate([s.values.get(name, spec.placeholder) for s in kept])
            present[name] = torch.tensor(mask, dtype=torch.bool)
        counts = DecodeCounts()
        for s in samples:
            counts.add(s.counts)
        return Batch(
            inputs=inputs,
            present=present,
            ids=[s.id for s in kept],
            labels=[s.label for s in kept],
            index=torch.tensor([s.index for s in kept], dtype=torch.long),
            bad=bad,
            keys=torch.tensor([s.key for s in kept], dtype=torch.long),
            counts=counts,
        )
