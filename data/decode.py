"""Decoders: file path or bytes -> raw modality value, with reasons for failures.

A decoder raises :class:`BadItem` with a short machine-readable ``reason`` when one item is
unusable; the dataset catches it, drops that modality for the row and counts the reason, so a
single broken file never stops a run.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from modalign.data.config import AudioConfig, ImageConfig

Source = str | Path | bytes


class BadItem(Exception):
    """One item (one modality of one row) cannot be used."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _read_bytes(source: Source) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise BadItem("missing_file", str(path))
        data = path.read_bytes()
    if not data:
        raise BadItem("empty_file", "" if isinstance(source, bytes) else str(source))
    return data


def decode_image(source: Source, cfg: ImageConfig) -> Image.Image:
    """Decode to a PIL image in mode ``L`` or ``RGB`` (fully loaded, so truncation shows here)."""
    data = _read_bytes(source)
    mode = "L" if cfg.channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            # PIL warns before it raises for bombs; treat both as the same bad item.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > cfg.max_pixels:
                    raise BadItem("image_too_large", f"{img.width}x{img.height} pixels")
                img.load()
                return img.convert(mode)
    except BadItem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadItem("image_too_large", str(exc)) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadItem("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def decode_audio(
    source: Source, cfg: AudioConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Decode to a mono float32 waveform at ``cfg.sample_rate``, cropped/padded to the clip length.

    ``rng`` given -> random crop (training); None -> centre crop (evaluation).
    """
    import soundfile as sf

    data = _read_bytes(source)
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise BadItem("unreadable_audio", f"{type(exc).__name__}: {exc}") from None
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if wave.size == 0:
        raise BadItem("empty_audio")
    if not np.all(np.isfinite(wave)):
        raise BadItem("nan_audio", "waveform holds NaN or inf")
    if float(np.max(np.abs(wave))) < 1e-6:
        raise BadItem("silent_audio")
    if sr != cfg.sample_rate:
        wave = resample(wave, sr, cfg.sample_rate)
    return crop_or_pad(wave, cfg.clip_samples, rng)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample with librosa (soxr backend)."""
    import librosa

    return librosa.resample(wave, orig_sr=orig_sr, target_sr=target_sr).astype(np.float32)


def crop_or_pad(wave: np.ndarray, length: int, rng: np.random.Generator | None) -> np.ndarray:
    """Random (rng) or centre crop to ``length``; zero-pad shorter clips symmetrically."""
    n = wave.shape[0]
    if n > length:
        start = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
        return np.ascontiguousarray(wave[start : start + length])
    if n < length:
        left = (length - n) // 2 if rng is None else int(rng.integers(0, length - n + 1))
        return np.pad(wave, (left, length - n - left))
    return wave


def decode_text(value: object) -> str:
    """Text is carried inline; an empty or non-string caption is a bad item."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise BadItem("empty_text")
        value = str(value)
    text = value.strip()
    if not text:
        raise BadItem("empty_text")
    return text
