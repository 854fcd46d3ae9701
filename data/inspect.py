"""``modalign data inspect SRC``: decode every item of a source and say what is usable.

The result is the JSON contract of ``docs/design.md`` (``items``, ``ok``, ``bad``,
``bad_by_reason``, ``modalities``) plus details: problems per modality, label counts, each
modality's own statistics (its spec's ``describe``/``stats``: image sizes, audio durations and
sample rates, caption lengths, or whatever a plugin declares) and the first bad items.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from modalign.data.batch import Sample
from modalign.data.config import DataConfig
from modalign.data.modality import MODALITIES, ModalitySpec, modality_specs
from modalign.data.preflight import duplicate_ids
from modalign.data.shards import ShardDataset
from modalign.data.sources import open_eval_source

MAX_EXAMPLES = 20


class _Describe:
    """``load`` replacement: full decode (``decode_raw``) but only the small ``describe`` stats."""

    def __init__(self, spec: ModalitySpec) -> None:
        self.spec = spec

    def __call__(self, source: Any, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        return dict(self.spec.inspect(source))


def inspection_specs(
    cfg: DataConfig | None = None, specs: Mapping[str, ModalitySpec] | None = None
) -> dict[str, ModalitySpec]:
    """Specs whose ``load`` fully decodes an item but returns only its statistics (default:
    every registered modality)."""
    specs = dict(specs) if specs is not None else modality_specs(MODALITIES.names(), cfg)
    return {
        m: dataclasses.replace(s, load=_Describe(s), placeholder=None) for m, s in specs.items()
    }


def inspect_source(
    src: str | Path,
    cfg: DataConfig | None = None,
    specs: Mapping[str, ModalitySpec] | None = None,
    num_workers: int = 0,
    max_examples: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """Decode every item of a manifest or shard pattern and count what is usable.

    Returns ``{"items", "ok", "bad", "bad_by_reason", "modalities", ...}``: ``items`` counts
    manifest rows (or shard samples, plus one per damaged shard tail), ``ok + bad == items``;
    ``bad_by_reason`` counts problems (an item may have several); ``modalities`` maps each
    modality to the number of items where it decoded. Extra keys: ``source``, ``format``,
    ``modality_bad``, ``labels``, ``examples``, ``duplicate_ids`` (``count`` and the first ids with
    their manifest lines, or occurrences for shards), ``unknown_columns`` (manifests) and each spec's
    statistics (built-ins: ``image_size``, ``audio_seconds``, ``audio_sample_rates``,
    ``text_chars``). Raises :class:`DataError` for an unusable source.
    """
    full = dict(specs) if specs is not None else modality_specs(MODALITIES.names(), cfg)
    wrapped = inspection_specs(specs=full)
    text = str(src)
    source = open_eval_source(text, wrapped)
    report = _Report(max_examples)
    report.add_skipped(source.skipped, source.skipped_examples)
    report.add_samples(_samples(source, num_workers), list(wrapped))
    fmt = (
        "webdataset" if isinstance(source, ShardDataset) else Path(text).suffix.lower().lstrip(".")
    )
    out = {"source": text, "format": fmt, **report.result(list(wrapped), full)}
    manifest = getattr(source, "manifest", None)
    if manifest is not None and manifest.unknown_columns:
        out["unknown_columns"] = manifest.unknown_columns
    out["duplicate_ids"] = _duplicates(report, manifest, max_examples)
    return out


def _duplicates(report: _Report, manifest: Any, max_examples: int) -> dict[str, Any]:
    """``{"count": ids seen more than once, "examples": [{"id", "lines"|"occurrences"}]}``."""
    if manifest is not None:
        dups = duplicate_ids(manifest.rows)
        examples: list[dict[str, Any]] = [
            {"id": i, "lines": ls} for i, ls in list(dups.items())[:max_examples]
        ]
        return {"count": len(dups), "examples": examples}
    repeated = [(i, n) for i, n in report.ids.items() if n > 1]
    examples = [{"id": i, "occurrences": n} for i, n in repeated[:max_examples]]
    return {"count": len(repeated), "examples": examples}


def _samples(source: Any, num_workers: int) -> Iterable[Sample]:
    # batch_size=None: samples come through one by one; workers only parallelise the decoding.
    loader = DataLoader(
        source,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,  # type: ignore[arg-type]  # torch's hint assumes batches (lists)
    )
    return iter(loader)


def _identity(sample: Sample) -> Sample:
    return sample


class _Report:
    """Running counts for :func:`inspect_source`."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.items = self.ok = self.bad = 0
        self.reasons: Counter = Counter()
        self.present: Counter = Counter()
        self.modality_bad: dict[str, Counter] = {}
        self.labels: Counter = Counter()
        self.stats: dict[str, list] = {}
        self.examples: list[dict[str, str]] = []
        self.ids: Counter = Counter()

    def add_skipped(self, skipped: Mapping[str, int], examples: Sequence[str]) -> None:
        for reason, n in skipped.items():
            self.items += n
            self.bad += n
            self.reasons[reason] += n
        for text in examples[: self.max_examples]:
            where, _, why = text.partition(": ")
            self._example(where, "-", "no_modality", why)

    def add_samples(self, samples: Iterable[Sample], modalities: list[str]) -> None:
        for sample in samples:
            self.items += 1
            self.ids[sample.id] += 1
            for rec in sample.bad:
                self.reasons[rec.reason] += 1
                self.modality_bad.setdefault(rec.modality, Counter())[rec.reason] += 1
                self._example(rec.item, rec.modality, rec.reason, rec.detail)
            if sample.bad:
                self.bad += 1
            else:
                self.ok += 1
            if sample.label is not None:
                self.labels[str(sample.label)] += 1
            for m in modalities:
                if m in sample.values:
                    self.present[m] += 1
                    for key, value in sample.values[m].items():
                        self.stats.setdefault(key, []).append(value)

    def _example(self, item: str, modality: str, reason: str, detail: str) -> None:
        if len(self.examples) < self.max_examples:
            self.examples.append(
                {"item": item, "modality": modality, "reason": reason, "detail": detail}
            )

    def result(self, modalities: list[str], specs: Mapping[str, ModalitySpec]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": self.items,
            "ok": self.ok,
            "bad": self.bad,
            "bad_by_reason": dict(self.reasons.most_common()),
            "modalities": {m: self.present[m] for m in modalities if self.present[m]},
            "modality_bad": {m: dict(c) for m, c in sorted(self.modality_bad.items())},
            "labels": dict(sorted(self.labels.items())),
            "examples": self.examples,
        }
        kinds = {k.key: k.kind for s in specs.values() for k in s.stats}
        for key, values in self.stats.items():
            out[key] = aggregate(values, kinds.get(key, "summary"))
        return out


AGGREGATES = ("minmax", "summary", "counts")


def aggregate(values: Sequence[Any], kind: str) -> Any:
    """One statistic over all items: see :class:`~modalign.data.modality.StatKind`."""
    if kind == "counts":
        return {str(k): v for k, v in Counter(values).most_common()}
    if kind == "minmax":
        arr = np.asarray(values, dtype=np.float64)
        return {"min": _plain(arr.min(axis=0)), "max": _plain(arr.max(axis=0))}
    if kind != "summary":
        raise ValueError(f"unknown statistic kind {kind!r}; valid: {', '.join(AGGREGATES)}")
    arr = np.asarray(values, dtype=np.float64)
    return {
        "min": round(float(arr.min()), 4),
        "mean": round(float(arr.mean()), 4),
        "max": round(float(arr.max()), 4),
        "total": round(float(arr.sum()), 4),
    }


def _plain(arr: np.ndarray) -> Any:
    if arr.ndim == 0:
        return int(arr) if float(arr).is_integer() else float(arr)
    return [int(v) if float(v).is_integer() else float(v) for v in arr]
