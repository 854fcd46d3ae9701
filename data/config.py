"""Data-layer configuration (the ``data`` section of a modalign config)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    train: str = ""  # SRC: manifest (.jsonl/.csv/.parquet) or WebDataset shard pattern
    val: str = ""
    num_workers: int = 0
    shuffle: bool = True
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    max_bad_fraction: float = 0.5  # abort if more than this fraction of items is bad
