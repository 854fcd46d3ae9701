"""Data-layer configuration (the ``data`` section of a modalign config)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from modalign.core.config_io import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Range,
)
from modalign.core.errors import ConfigError
from modalign.core.registry import Registry

# Built-in modalities whose options keep their own top-level section (``data.image``...).
SECTION_OPTIONS = ("image", "audio")


@dataclass
class AudioConfig:
    """Waveform decoding and the log-mel front end (computed batched on the device)."""

    sample_rate: Annotated[int, AT_LEAST_1] = 16000
    clip_seconds: Annotated[float, POSITIVE] = 1.0
    n_mels: Annotated[int, AT_LEAST_1] = 64
    n_fft: Annotated[int, Range(ge=2)] = 400
    hop_length: Annotated[int, AT_LEAST_1] = 160
    f_min: Annotated[float, NON_NEGATIVE] = 0.0
    f_max: Annotated[float | None, POSITIVE] = None
    top_db: Annotated[float, POSITIVE] = 80.0
    spec_augment: bool = False  # time/frequency masking while training
    freq_mask: Annotated[int, NON_NEGATIVE] = 8
    time_mask: Annotated[int, NON_NEGATIVE] = 10

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.clip_seconds <= 0:
            raise ValueError("audio.sample_rate and audio.clip_seconds must be positive")

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)


@dataclass
class ImageConfig:
    """Image decoding and augmentation; size/mean/std come from the image tower."""

    channels: Literal[1, 3] = 3  # 1 = greyscale ("L"), 3 = RGB
    max_pixels: Annotated[int, AT_LEAST_1] = 64_000_000  # decompression-bomb limit
    train_scale_min: Annotated[float, Range(gt=0, le=1)] = (
        0.08  # RandomResizedCrop lower scale bound
    )
    hflip: Annotated[float, FRACTION] = 0.5
    color_jitter: Annotated[float, NON_NEGATIVE] = 0.0


ITEM_CACHES: Registry[Callable[[Any], Any]] = Registry("item cache", "modalign.item_caches")
"""Decoded-item caches named by ``data.cache.kind``: ``factory(options) -> ItemCache | None``
(:class:`modalign.data.cache.ItemCache`). The built-ins (``none``, ``memory``, ``disk``) are
registered by :mod:`modalign.data.cache`; the registry sits beside :class:`CacheSpec`, which
names its entries, so the config is checked when built without importing the caches."""


@dataclass
class CacheSpec:
    """``data.cache``: the decoded-item cache (:mod:`modalign.data.cache`), an entry of
    ``ITEM_CACHES`` (``none``, ``memory``, ``disk`` or a plugin's) and its options; the short
    form ``cache: memory`` names the kind alone."""

    kind: str = "none"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ITEM_CACHES.get(self.kind, "data.cache.kind")
        ITEM_CACHES.options(self.kind, self.options, "data.cache.options")  # checked up front


def cache_spec(value: Any) -> CacheSpec:
    """``data.cache`` as a :class:`CacheSpec`: from a spec, a mapping, or a bare kind name."""
    if isinstance(value, CacheSpec):
        return value
    if isinstance(value, str):
        return CacheSpec(value)
    if isinstance(value, dict):
        from modalign.core.config_io import from_dict

        return from_dict(CacheSpec, value, "data.cache")
    raise ConfigError(
        f"data.cache: expected a cache kind (none, memory, disk) or {{kind: ..., options: "
        f"{{...}}}}, got {value!r}"
    )


@dataclass
class DataConfig:
    """Where the data is and how to decode it."""

    # SRC: manifest (.jsonl/.csv/.parquet), WebDataset shard pattern, or {SRC: weight} mix
    train: str | dict[str, Annotated[float, POSITIVE]] = ""
    val: str = ""
    num_workers: Annotated[int, NON_NEGATIVE] = 0
    prefetch_factor: Annotated[int, AT_LEAST_1] = (
        2  # batches each worker decodes ahead (with num_workers > 0)
    )
    shuffle: bool = True
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    max_bad_fraction: Annotated[float, FRACTION] = (
        0.5  # abort if more than this fraction of items is bad
    )
    # Options of plugin modalities, by name (checked by the modality's options dataclass).
    modalities: dict[str, Any] = field(default_factory=dict)
    # Decoded-item cache: none (default) | memory | disk, e.g. {kind: disk, options: {dir: D}}
    cache: Any = field(default_factory=CacheSpec)

    def __post_init__(self) -> None:
        self.cache = cache_spec(self.cache)
        both = [m for m in SECTION_OPTIONS if m in self.modalities]
        if both:
            raise ConfigError(
                f"data.modalities.{both[0]}: {both[0]} options live in the data.{both[0]} section; "
                f"move them there"
            )

    def modality_options(self, name: str) -> Any:
        """Raw options for modality ``name``: its section (``data.image``) or ``data.modalities``."""
        if name in SECTION_OPTIONS:
            return getattr(self, name)
        return self.modalities.get(name)
