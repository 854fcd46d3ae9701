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
        try:
            data = path.read_bytes()
        except OSError as exc:  # a directory, no permission, an I/O error on a bad disk
            raise BadItem("unreadable_file", f"{path}: {type(exc).__name__}") from None
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
        raise BadItem(_unreadable("corrupt_image", source), _why(exc)) from None


def decode_audio(
    source: Source, cfg: AudioConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Decode to a mono float32 waveform at ``cfg.sample_rate``, cropped/padded to the clip length.

    ``rng`` given -> random crop (training); None -> centre crop (evaluation). Another sample rate
    is resampled, not rejected.
    """
    wave, sr = read_audio(source)
    if sr != cfg.sample_rate:
        wave = resample(wave, sr, cfg.sample_rate)
    return crop_or_pad(wave, cfg.clip_samples, rng)


# Formats libsndfile may lack (MP3 needs libsndfile >= 1.1); librosa/audioread can try them.
FALLBACK_AUDIO = (".mp3", ".m4a", ".aac", ".opus", ".wma")


def read_audio(source: Source) -> tuple[np.ndarray, int]:
    """Mono float32 waveform at its own sample rate; empty, NaN/inf and silent clips are bad."""
    data = _read_bytes(source)
    try:
        wave, sr = _read_soundfile(data)
    except Exception as exc:
        if not _looks_compressed(source, data):
            raise BadItem(_unreadable("unreadable_audio", source), _why(exc)) from None
        wave, sr = _read_librosa(source, data, exc)
    if wave.size == 0:
        raise BadItem("empty_audio")
    if not np.all(np.isfinite(wave)):
        raise BadItem("nan_audio", "waveform holds NaN or inf")
    if float(np.max(np.abs(wave))) < 1e-6:
        raise BadItem("silent_audio")
    return wave, sr


def _read_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return (wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]), int(sr)


def _looks_compressed(source: Source, data: bytes) -> bool:
    # ID3 tag or an MPEG frame sync: bytes from a shard have no file name to go by.
    if not isinstance(source, bytes):
        return Path(source).suffix.lower() in FALLBACK_AUDIO
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _read_librosa(source: Source, data: bytes, first: Exception) -> tuple[np.ndarray, int]:
    """librosa.load (audioread backends such as ffmpeg) for what libsndfile cannot read."""
    import tempfile

    import librosa

    try:
        if isinstance(source, bytes):
            # audioread needs a file name; the temporary file lives only for this call.
            with tempfile.NamedTemporaryFile(suffix=".mp3") as tmp:
                tmp.write(data)
                tmp.flush()
                wave, sr = librosa.load(tmp.name, sr=None, mono=True)
        else:
            wave, sr = librosa.load(str(source), sr=None, mono=True)
    except Exception as exc:
        raise BadItem(
            "unreadable_audio", f"soundfile: {_why(first)}; librosa: {_why(exc)}"
        ) from None
    return np.asarray(wave, dtype=np.float32), int(sr)


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _unreadable(reason: str, source: Source) -> str:
    """``reason``, or ``unknown_extension`` when a file's suffix names no known format."""
    if isinstance(source, bytes):
        return reason
    suffix = Path(source).suffix.lower()
    return reason if suffix in _known_extensions() else "unknown_extension"


def _known_extensions() -> frozenset[str]:
    import soundfile as sf

    audio = {f".{k.lower()}" for k in sf.available_formats()} | {".wav", ".oga", ".ogg"}
    image = set(Image.registered_extensions())
    return frozenset(audio | image | set(FALLBACK_AUDIO))


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
