"""Builders for data-layer tests: small valid and deliberately broken files, manifests, shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset, ModalitySpec, default_modalities


def small_config() -> DataConfig:
    """Greyscale 16 px images, 8 kHz half-second clips: cheap to decode in tests."""
    cfg = DataConfig()
    cfg.image.channels = 1
    cfg.image.hflip = 0.0
    cfg.audio.sample_rate = 8000
    cfg.audio.clip_seconds = 0.5
    return cfg


def small_specs() -> dict[str, ModalitySpec]:
    """image/audio/text specs for :func:`small_config` and 16 px images."""
    return default_modalities(small_config(), ImagePreset(input_size=16))


def png_bytes(value: int = 128, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: int = 32, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wav_bytes(
    wave: np.ndarray | None = None, sr: int = 8000, subtype: str = "PCM_16", fmt: str = "WAV"
) -> bytes:
    import soundfile as sf

    if wave is None:
        t = np.arange(sr // 2) / sr
        wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid-header PNG claiming width x height pixels, a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the header is what matters
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def write_manifest(path: Path, rows: Sequence[Mapping]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_shard(path: Path, samples: Sequence[Mapping[str, bytes | str]]) -> Path:
    """A tar shard; each sample maps ``"__key__"`` and member extensions to contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                blob = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def text_shards(root: Path, shard_sizes: Sequence[int], prefix: str = "s") -> str:
    """Shards of text-only samples ``{prefix}{shard}-{i}``; returns the brace pattern."""
    for s, n in enumerate(shard_sizes):
        samples = [
            {"__key__": f"{prefix}{s}-{i:04d}", "txt": f"caption {s} {i}", "cls": str(i % 3)}
            for i in range(n)
        ]
        write_shard(root / f"shard-{s:06d}.tar", samples)
    return str(root / f"shard-{{000000..{len(shard_sizes) - 1:06d}}}.tar")


def text_manifest(root: Path, n: int) -> Path:
    return write_manifest(
        root / "m.jsonl",
        [{"id": f"row{i}", "text": f"caption {i}", "label": "a"} for i in range(n)],
    )


def batch_ids(batches: Sequence[Mapping]) -> list[list[str]]:
    return [list(b.ids) for b in batches]
