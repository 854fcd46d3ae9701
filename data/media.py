"""What a file's bytes are and what decoding them costs, read from their first bytes / header.

* :func:`sniff_image` / :func:`sniff_audio`: the media type of a file's bytes among those the
  modality declares (``IMAGE_MEDIA_TYPES`` / ``AUDIO_MEDIA_TYPES``), from its signature ("magic
  number"), never from its name; None for anything else. A server serves only these types.
* :func:`image_decode_bytes` / :func:`audio_decode_bytes`: the peak memory (bytes) that
  decoding the file takes, from its header alone (size, mode, bit depth, frames) -- a 124 KB
  16-bit PNG of 7990x7990 pixels decodes to gigabytes, so the upload size says nothing.

Builtin modalities expose them as :attr:`ModalitySpec.sniff` / :attr:`ModalitySpec.decode_bytes`.
"""

from __future__ import annotations

import io
import math

__all__ = [
    "AUDIO_MEDIA_TYPES",
    "IMAGE_MEDIA_TYPES",
    "SNIFF_BYTES",
    "audio_decode_bytes",
    "image_decode_bytes",
    "sniff_audio",
    "sniff_image",
]

SNIFF_BYTES = 16  # every signature below fits in the first 16 bytes

IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
AUDIO_MEDIA_TYPES = ("audio/wav", "audio/flac", "audio/ogg", "audio/mpeg")


def sniff_image(head: bytes) -> str | None:
    """``image/png`` ... from the first bytes of a file, or None when it is no declared image."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"BM") and len(head) >= 14:
        return "image/bmp"
    return None


def sniff_audio(head: bytes) -> str | None:
    """``audio/wav`` ... from the first bytes of a file, or None when it is no declared audio."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    return None


# Bytes per pixel PIL stores per mode (RGB is padded to 4), and what decode_image's 8-bit
# scaling of >8-bit modes (I;16*, I, F) holds at once: float64 copies of the plane.
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4,
           "PA": 4, "La": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4,
           "YCbCr": 4, "LAB": 4, "HSV": 4, "I": 4, "F": 4}  # fmt: skip
_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_SCALING = 3 * 8 + 1  # float64 plane, clipped copy, scaled copy, uint8 result


def image_decode_bytes(data: bytes) -> int:
    """Peak bytes :func:`~modalign.data.decode.decode_image` needs for ``data`` (header only):
    the decoded plane, its upright copy, the 8-bit scaling of >8-bit images, the RGB result.
    Raises ValueError when the header cannot be read (the decode would fail too)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            width, height, mode = img.width, img.height, img.mode
            frames = 1  # decode_image uses the first frame
    except Exception as exc:
        raise ValueError(f"unreadable image header ({type(exc).__name__})") from None
    pixels = width * height
    stored = _STORED.get(mode, 8)
    per_pixel = 2 * stored + (_SCALING if mode in _WIDE else 0) + 4
    return pixels * per_pixel * frames


def audio_decode_bytes(data: bytes, clip_seconds: float) -> int:
    """Peak bytes decoding audio ``data`` takes (header only): the float32 frames of every
    channel plus the mono mix and its resampled copy. A recording longer than the clip is read
    one window at a time (``clip_seconds`` of source frames plus resampling context). A file
    libsndfile cannot open (MP3 through the fallback decoder) is estimated at 12 float32
    samples per byte (MP3 at 32 kbit/s, mono); a header declaring no frames raises ValueError."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        return len(data) * 12 * 4 * 3
    channels = max(int(info.channels), 1)
    frames, rate = int(info.frames), max(int(info.samplerate), 1)
    if frames <= 0:
        raise ValueError("the audio header declares no frames")
    window = math.ceil(clip_seconds * rate) + math.ceil(0.1 * rate)
    read = min(frames, window)
    return read * channels * 4 + read * 4 * 2
