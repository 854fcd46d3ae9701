"""Data-layer configuration (the ``data`` section of a modalign config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modalign.core.errors import ConfigError

# Built-in modalities whose options keep their own top-level section (``data.image``...).
SECTION_OPTIONS = ("image", "audio")


@dataclass
class AudioConfig:
    """Waveform decoding and the log-mel front end (computed batched on the device)."""

    sample_rate: int = 16000
    clip_seconds: float = 1.0
    n_mels: int = 64
    n_fft: int = 400
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float | None = None
    top_db: float = 80.0
    spec_augment: bool = False  # time/frequency masking while training
    freq_mask: int = 8
    time_mask: int = 10

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.clip_seconds <= 0:
            raise ValueError("audio.sample_rate and audio.clip_seconds must be positive")

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)


@dataclass
class ImageConfig:
    """Image decoding and augmentation; size/mean/std come from the image tower."""

    channels: int = 3  # 1 = greyscale ("L"), 3 = RGB
    max_pixels: int = 64_000_000  # decompression-bomb limit
    train_scale_min: float = 0.08  # RandomResizedCrop lower scale bound
    hflip: float = 0.5
    color_jitter: float = 0.0


@dataclass
class DataConfig:
    """Where the data is and how to decode it."""

    # SRC: manifest (.jsonl/.csv/.parquet), WebDataset shard pattern, or {SRC: weight} mix
    train: str | dict[str, float] = ""
    val: str = ""
    num_workers: int = 0
    shuffle: bool = True
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    max_bad_fraction: float = 0.5  # abort if more than this fraction of items is bad
    # Options of plugin modalities, by name (checked by the modality's options dataclass).
    modalities: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
