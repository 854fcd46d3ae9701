"""``modalign data inspect SRC``: decode every item of a source and say what is usable.

The result is the JSON contract of ``docs/design.md`` (``items``, ``ok``, ``bad``,
``bad_by_reason``, ``modalities``) plus details: problems per modality, label counts, image
sizes, audio durations and the first bad items with file and reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from modalign.data.config import DataConfig
from modalign.data.dataset import PairedDataset
from modalign.data.decode import decode_image, decode_text, read_audio
from modalign.data.manifest import read_manifest
from modalign.data.modality import ModalitySpec
from modalign.data.shards import ShardDataset, is_shard_pattern

MAX_EXAMPLES = 20


def inspection_specs(cfg: DataConfig | None = None) -> dict[str, ModalitySpec]:
    """image/audio/text specs that fully decode an item but return only small stats."""
    cfg = cfg or DataConfig()

    def image(source: Any, train: bool, rng: np.random.Generator) -> tuple[int, int]:
        return decode_image(source, cfg.image).size

    def audio(source: Any, train: bool, rng: np.random.Generator) -> tuple[float, int]:
        wave, sr = read_audio(source)  # no resampling: the checks do not need it
        return wave.shape[0] / sr, sr

    def text(value: Any, train: bool, rng: np.random.Generator) -> int:
        return len(decode_text(value))

    return {
        "image": ModalitySpec(
            "image", image, None, extensions=("jpg", "jpeg", "png", "webp", "bmp")
        ),
        "audio": ModalitySpec("audio", audio, None, extensions=("wav", "flac", "ogg", "mp3")),
        "text": ModalitySpec("text", text, None, inline=True, extensions=("txt",)),
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
    ``modality_bad``, ``labels``, ``image_size``, ``audio_seconds``, ``audio_sample_rates``,
    ``text_chars``, ``examples``. Raises :class:`DataError` for an unusable source.
    """
    specs = dict(specs or inspection_specs(cfg))
    report = _Report(max_examples)
    text = str(src)
    if is_shard_pattern(text):
        dataset: Any = ShardDataset(text, specs, shuffle=False, rank=0, world_size=1)
        fmt = "webdataset"
    else:
        inline = [m for m, s in specs.items() if s.inline]
        manifest = read_manifest(text, list(specs), inline=inline)
        report.add_skipped(manifest.skipped, manifest.skipped_examples)
        dataset = PairedDataset.from_manifest(manifest, specs, train=False)
        fmt = Path(text).suffix.lower().lstrip(".")
    report.add_samples(_samples(dataset, num_workers), list(specs))
    return {"source": text, "format": fmt, **report.result(list(specs))}


def _samples(dataset: Any, num_workers: int) -> Iterable[dict[str, Any]]:
    # batch_size=None: samples come through one by one; workers only parallelise the decoding.
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        shuffle=False,
    )
    return iter(loader)


def _identity(sample: dict[str, Any]) -> dict[str, Any]:
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
        self.stats: dict[str, list] = {"image": [], "audio": [], "rate": [], "text": []}
        self.examples: list[dict[str, str]] = []

    def add_skipped(self, skipped: Mapping[str, int], examples: Sequence[str]) -> None:
        for reason, n in skipped.items():
            self.items += n
            self.bad += n
            self.reasons[reason] += n
        for text in examples[: self.max_examples]:
            where, _, why = text.partition(": ")
            self._example(where, "-", "no_modality", why)

    def add_samples(self, samples: Iterable[dict[str, Any]], modalities: list[str]) -> None:
        for sample in samples:
            self.items += 1
            for rec in sample["bad"]:
                self.reasons[rec.reason] += 1
                self.modality_bad.setdefault(rec.modality, Counter())[rec.reason] += 1
                self._example(rec.item, rec.modality, rec.reason, rec.detail)
            if sample["bad"]:
                self.bad += 1
            else:
                self.ok += 1
            if sample.get("label") is not None:
                self.labels[str(sample["label"])] += 1
            for m in modalities:
                if m in sample:
                    self.present[m] += 1
                    self._stat(m, sample[m])

    def _stat(self, modality: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            return  # user-supplied specs: no stats, just the count
        if modality == "image" and isinstance(value, tuple | list):
            self.stats["image"].append(tuple(int(v) for v in value))
        elif modality == "audio" and isinstance(value, tuple | list):
            self.stats["audio"].append(float(value[0]))
            self.stats["rate"].append(int(value[1]))
        elif modality == "text" and isinstance(value, int):
            self.stats["text"].append(value)

    def _example(self, item: str, modality: str, reason: str, detail: str) -> None:
        if len(self.examples) < self.max_examples:
            self.examples.append(
                {"item": item, "modality": modality, "reason": reason, "detail": detail}
            )

    def result(self, modalities: list[str]) -> dict[str, Any]:
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
        if self.stats["image"]:
            sizes = np.array(self.stats["image"])
            out["image_size"] = {
                "min": [int(v) for v in sizes.min(axis=0)],
                "max": [int(v) for v in sizes.max(axis=0)],
            }
        if self.stats["audio"]:
            out["audio_seconds"] = _summary(self.stats["audio"])
            out["audio_sample_rates"] = {
                str(k): v for k, v in Counter(self.stats["rate"]).most_common()
            }
        if self.stats["text"]:
            out["text_chars"] = _summary(self.stats["text"])
        return out


def _summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "min": round(float(arr.min()), 4),
        "mean": round(float(arr.mean()), 4),
        "max": round(float(arr.max()), 4),
        "total": round(float(arr.sum()), 4),
    }
