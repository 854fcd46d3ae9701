"""Decoders: file path or bytes -> raw modality value, with reasons for failures.

A decoder raises :class:`BadItem` with a short machine-readable ``reason`` when one item is
unusable; the dataset catches it, drops that modality for the row and counts the reason, so a
single broken file never stops a run.
"""

from __future__ import annotations

import errno
import io
import math
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

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
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadItem("missing_file", str(path)) from None
        except OSError as exc:  # a directory, no permission, a symlink loop, a bad disk
            reason = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable_file"
            raise BadItem(reason, f"{path}: {type(exc).__name__}") from None
    if not data:
        raise BadItem("empty_file", "" if isinstance(source, bytes) else str(source))
    return data


def decode_image(source: Source, cfg: ImageConfig) -> Image.Image:
    """Decode to a PIL image in mode ``L`` or ``RGB`` (fully loaded, so truncation shows here).

    EXIF orientation is applied (a phone photo stored sideways comes out upright). Images with
    more than 8 bits per sample are *scaled* to 8 bits, not clipped: 16-bit integer modes
    (``I;16*``, and ``I`` as 16-bit PNG/TIFF decoders give it) by 255/65535, float images
    (``F``) taken as [0, 1].
    """
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
                upright = ImageOps.exif_transpose(img)
                return to_8bit(upright).convert(mode)
    except BadItem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadItem("image_too_large", str(exc)) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadItem(_unreadable("corrupt_image", source), _why(exc)) from None


def to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel image with more than 8 bits per sample scaled to mode ``L``."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        scaled = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
    elif img.mode == "F":
        scaled = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0.0, 1.0) * 255.0
    else:
        return img
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def decode_audio(
    source: Source, cfg: AudioConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Decode to a mono float32 waveform at ``cfg.sample_rate``, cropped/padded to the clip length.

    ``rng`` given -> random crop (training); None -> centre crop (evaluation). Another sample rate
    is resampled, not rejected. Files libsndfile reads (WAV, FLAC, OGG, ...) that are longer
    than the clip are read only over the window the crop needs (seek + frames), so a long
    recording costs one clip's decode and resample, not the whole file's.
    """
    window = read_audio_window(source, cfg, rng)
    if window is not None:
        return window
    wave, sr = read_audio(source)
    if sr != cfg.sample_rate:
        wave = resample(wave, sr, cfg.sample_rate)
    return crop_or_pad(wave, cfg.clip_samples, rng)


def prepare_audio(source: Source, cfg: AudioConfig) -> dict[str, np.ndarray]:
    """The cacheable half of :func:`decode_audio`: the whole recording, decoded once.

    A recording longer than the clip: ``{"wave": mono float32 at the file's own rate, "sr":
    that rate, "frames": libsndfile's frame count}``; each epoch's window is cut (and checked,
    and resampled) by :func:`augment_audio` exactly as the windowed file read does. Any other
    (shorter, or read by the librosa fallback): checked here (empty, NaN, silent: BadItem,
    nothing to cache) and resampled to ``cfg.sample_rate`` once, ``"frames": -1``.
    """
    import soundfile as sf

    data = _read_bytes(source)
    check_wav_length(data, len(data))
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, frames = int(f.samplerate), int(f.frames)
            wave = f.read(dtype="float32", always_2d=True)
        wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    except Exception as exc:
        if not _looks_compressed(source, data):
            raise BadItem(_unreadable("unreadable_audio", source), _why(exc)) from None
        (wave, sr), frames = _read_librosa(source, data, exc), -1
    if frames < 0 or not is_long(sr, frames, cfg):  # the whole-file path: check and resample
        wave, frames = _checked(wave), -1
        if sr != cfg.sample_rate:
            wave, sr = resample(wave, sr, cfg.sample_rate), cfg.sample_rate
    out = {"wave": np.ascontiguousarray(wave, dtype=np.float32)}
    return out | {"sr": np.array(sr, dtype=np.int64), "frames": np.array(frames, dtype=np.int64)}


def augment_audio(
    raw: dict[str, np.ndarray], cfg: AudioConfig, rng: np.random.Generator | None
) -> np.ndarray:
    """:func:`decode_audio`'s clip from :func:`prepare_audio`'s result (same draws, same
    samples: the window rule is :func:`crop_window` for both). Returns a new array."""
    wave, sr, frames = raw["wave"], int(raw["sr"]), int(raw["frames"])
    if frames >= 0:
        clip = crop_window(lambda lo, n: wave[lo : lo + n], sr, frames, cfg, rng)
        if clip is not None:
            return np.array(clip, dtype=np.float32)
    if sr != cfg.sample_rate:
        wave = resample(wave, sr, cfg.sample_rate)
    return np.array(crop_or_pad(wave, cfg.clip_samples, rng), dtype=np.float32)


# Formats libsndfile may lack (MP3 needs libsndfile >= 1.1); librosa/audioread can try them.
FALLBACK_AUDIO = (".mp3", ".m4a", ".aac", ".opus", ".wma")


def read_audio(source: Source) -> tuple[np.ndarray, int]:
    """Mono float32 waveform at its own sample rate; empty, NaN/inf, silent and truncated clips
    are bad."""
    data = _read_bytes(source)
    check_wav_length(data, len(data))
    try:
        wave, sr = _read_soundfile(data)
    except Exception as exc:
        if not _looks_compressed(source, data):
            raise BadItem(_unreadable("unreadable_audio", source), _why(exc)) from None
        wave, sr = _read_librosa(source, data, exc)
    return _checked(wave), sr


def _checked(wave: np.ndarray) -> np.ndarray:
    if wave.size == 0:
        raise BadItem("empty_audio")
    if not np.all(np.isfinite(wave)):
        raise BadItem("nan_audio", "waveform holds NaN or inf")
    if float(np.max(np.abs(wave))) < 1e-6:
        raise BadItem("silent_audio")
    return wave


def read_audio_window(
    source: Source, cfg: AudioConfig, rng: np.random.Generator | None
) -> np.ndarray | None:
    """The clip :func:`decode_audio` returns, reading only the frames the crop needs.

    None when libsndfile cannot open ``source`` or the recording is no longer than the clip
    (then the whole-file path decides, with its bad-item reasons). The crop start is drawn
    exactly as :func:`crop_or_pad` draws it; at the file's own rate the result is the same
    samples, after resampling it equals the whole-file result to resampler precision
    (``_RESAMPLE_MARGIN`` source seconds of context on each side).
    """
    import soundfile as sf

    if isinstance(source, bytes):
        check_wav_length(source, len(source))
    else:
        try:
            with open(source, "rb") as fh:
                head, size = fh.read(_WAV_HEAD), os.fstat(fh.fileno()).st_size
        except OSError:
            return None  # the whole-file path names the reason
        check_wav_length(head, size)
    try:
        f = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except Exception:
        return None
    with f:
        return crop_window(lambda lo, n: _read_frames(f, lo, n), int(f.samplerate), int(f.frames),
                           cfg, rng)  # fmt: skip


_WAV_HEAD = 1 << 16  # bytes read to find a WAV's data chunk header


def check_wav_length(head: bytes, size: int) -> None:
    """BadItem ``truncated_audio`` when a RIFF/WAVE file is shorter than its header says.

    ``head``: the file's first bytes (at least up to its ``data`` chunk header to be checked),
    ``size``: the file's whole length. libsndfile reads such a file up to where it ends (a
    16-byte remnant of an 11,756-byte clip decodes as 8 samples), so the header is checked
    here: a ``data`` chunk (or any chunk before it) declaring more bytes than the file holds
    is a corrupt file everywhere, a query as much as a manifest item. A size field of 0 or
    0xFFFFFFFF (a stream written before its length was known) is not checked.
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return
    order = "<" if head[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(head):
        chunk, declared = (
            head[pos : pos + 4],
            struct.unpack(order + "I", head[pos + 4 : pos + 8])[0],
        )
        present = size - (pos + 8)
        if declared in (0, 0xFFFFFFFF) and chunk == b"data":
            return
        if declared > present:
            raise BadItem(
                "truncated_audio",
                f"the WAV header declares {declared} bytes in chunk "
                f"{chunk.decode('latin-1')!r}, {max(0, present)} are present (a cut-off file)",
            )
        if chunk == b"data":
            return
        pos += 8 + declared + (declared & 1)


def is_long(sr: int, frames: int, cfg: AudioConfig) -> bool:
    """True when a recording of ``frames`` at ``sr`` is longer than the clip at the target rate
    (then only a window is read and checked; see :func:`crop_window`)."""
    n_out = frames if sr == cfg.sample_rate else math.ceil(frames * cfg.sample_rate / sr)
    return frames > 0 and n_out > cfg.clip_samples


def crop_window(
    read: Callable[[int, int], np.ndarray],
    sr: int,
    frames: int,
    cfg: AudioConfig,
    rng: np.random.Generator | None,
) -> np.ndarray | None:
    """The clip of a long recording from ``read(first_frame, count)`` (mono at ``sr``), or None
    when it is not longer than the clip. The one window rule, for files and decoded arrays."""
    if not is_long(sr, frames, cfg):
        return None
    length, ratio = cfg.clip_samples, cfg.sample_rate / sr
    n_out = frames if sr == cfg.sample_rate else math.ceil(frames * ratio)
    start = int(rng.integers(0, n_out - length + 1)) if rng is not None else (n_out - length) // 2
    if sr == cfg.sample_rate:
        return _checked(read(start, length))
    margin = math.ceil(_RESAMPLE_MARGIN * sr)
    lo = max(0, math.floor(start / ratio) - margin)
    hi = min(frames, math.ceil((start + length) / ratio) + margin)
    wave = resample(_checked(read(lo, hi - lo)), sr, cfg.sample_rate)
    offset = start - round(lo * ratio)
    clip = wave[offset : offset + length]
    return np.ascontiguousarray(np.pad(clip, (0, length - clip.shape[0])))


_RESAMPLE_MARGIN = 0.05  # seconds of source context kept on each side of a resampled window


def _read_frames(f: Any, start: int, count: int) -> np.ndarray:
    f.seek(start)
    wave = f.read(count, dtype="float32", always_2d=True)
    return wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]


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
    """Text is carried inline; an empty caption is a bad item, and so is a value that is not
    text (a list of captions, an object, a boolean: ``text_not_string``, never its repr)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise BadItem("empty_text")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadItem("text_not_string", f"{type(value).__name__}: {str(value)[:60]}")
        value = str(value)
    text = value.strip()
    if not text:
        raise BadItem("empty_text")
    return text
