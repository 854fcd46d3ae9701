"""``modalign data pack SRC --out DIR``: a manifest -> WebDataset shards.

Each row becomes one sample ``KEY.{jpg,png,wav,...}`` + ``KEY.txt`` + ``KEY.cls`` (the label) +
``KEY.json`` (``id``, ``label``, source line). Every file is decoded once to check it; a bad
modality is left out of its sample and counted, a row with nothing usable is skipped. Each shard
is written under a temporary name and renamed when complete, so a crash never leaves a
half-written ``shard-*.tar`` that readers would take for a finished one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modalign.core.errors import DataError
from modalign.data.config import DataConfig
from modalign.data.decode import BadItem, decode_image, decode_text, read_audio
from modalign.data.manifest import ManifestRow, read_manifest

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")
INDEX_FILE = "index.json"


def pack_shards(
    src: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    cfg: DataConfig | None = None,
    max_examples: int = 20,
) -> dict[str, Any]:
    """Write ``out_dir/{prefix}-000000.tar ...`` with ``shard_size`` samples each.

    Returns ``{"pattern", "shards", "items", "written", "bad", "bad_by_reason", "examples",
    "out", "removed_stale"}`` where ``pattern`` is the brace pattern to pass as SRC, ``items`` the manifest's
    rows, ``written`` the samples packed and ``bad`` the rows dropped entirely (``bad_by_reason``
    counts every problem, including modalities dropped from kept rows). Also writes
    ``index.json`` (the same plus per-shard sample counts). Raises :class:`DataError` for an
    unusable manifest or a non-positive ``shard_size``.
    """
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    cfg = cfg or DataConfig()
    manifest = read_manifest(src, ["image", "audio", "text"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reasons: Counter = Counter(manifest.skipped)
    examples = list(manifest.skipped_examples)[:max_examples]
    writer = _ShardWriter(out, prefix, shard_size)
    dropped = sum(manifest.skipped.values())
    for row in manifest.rows:
        members, problems = _members(row, cfg)
        for modality, exc in problems:
            reasons[exc.reason] += 1
            if len(examples) < max_examples:
                examples.append(f"{manifest.path}:{row.line} [{modality}] {exc}")
        if not any(k.rsplit(".", 1)[-1] not in ("json", "cls") for k in members):
            dropped += 1
            continue
        writer.add(members, row)
    writer.close()
    stale = _remove_stale(out, prefix, len(writer.counts))
    result = {
        "out": str(out),
        "pattern": writer.pattern(),
        "shards": len(writer.counts),
        "items": len(manifest.rows) + sum(manifest.skipped.values()),
        "written": sum(writer.counts),
        "bad": dropped,
        "bad_by_reason": dict(reasons.most_common()),
        "examples": examples,
        "removed_stale": stale,
    }
    _atomic_write(out / INDEX_FILE, json.dumps({**result, "counts": writer.counts}, indent=1))
    return result


def _members(row: ManifestRow, cfg: DataConfig) -> tuple[dict[str, bytes], list]:
    """Tar member suffix -> bytes for one row, and the (modality, BadItem) problems found."""
    members: dict[str, bytes] = {}
    problems: list[tuple[str, BadItem]] = []
    for modality, value in row.values.items():
        try:
            ext, data = _encode(modality, value, cfg)
        except BadItem as exc:
            if exc.detail != value and modality != "text":
                exc = BadItem(exc.reason, f"{value}: {exc.detail}" if exc.detail else value)
            problems.append((modality, exc))
            continue
        members[ext] = data
    meta = {"id": row.id, "label": row.label, "line": row.line}
    members["json"] = json.dumps(meta).encode()
    if row.label is not None:
        members["cls"] = row.label.encode()
    return members, problems


def _encode(modality: str, value: str, cfg: DataConfig) -> tuple[str, bytes]:
    """(member extension, bytes) for one modality value; checks it decodes first."""
    if modality == "text":
        return "txt", decode_text(value).encode()
    path = Path(value)
    ext = path.suffix.lower().lstrip(".")
    if modality == "image":
        img = decode_image(path, cfg.image)
        if ext in IMAGE_EXTENSIONS:
            return ext, path.read_bytes()
        buf = io.BytesIO()  # a format shard readers do not map to "image": store as PNG
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    if modality == "audio":
        wave, sr = read_audio(path)
        if ext in AUDIO_EXTENSIONS:
            return ext, path.read_bytes()
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, wave, sr, format="WAV", subtype="FLOAT")
        return "wav", buf.getvalue()
    raise BadItem("unknown_modality", modality)


class _ShardWriter:
    """Rolls samples into fixed-size shards, each written to a temp name then renamed."""

    def __init__(self, out: Path, prefix: str, shard_size: int) -> None:
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._n = 0

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def pattern(self) -> str:
        last = max(len(self.counts) - 1, 0)
        if last == 0:
            return str(self.out / self._name(0))
        return str(self.out / f"{self.prefix}-{{{0:06d}..{last:06d}}}.tar")

    def add(self, members: Mapping[str, bytes], row: ManifestRow) -> None:
        if self._tar is None:
            self._open()
        key = f"{sum(self.counts) + self._n:09d}"  # dot-free: WebDataset keys end at the first dot
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = (
                len(data),
                0,
                0o644,
            )  # mtime 0: same input, same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._n += 1
        if self._n == self.shard_size:
            self._finish()

    def _open(self) -> None:
        final = self.out / self._name(len(self.counts))
        self._tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        # Closed in _finish once the shard is full (or at the end): it spans many add() calls.
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.out / self._name(len(self.counts)))
        self.counts.append(self._n)
        self._tar, self._tmp, self._n = None, None, 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish()


def _remove_stale(out: Path, prefix: str, shards: int) -> list[str]:
    """Delete ``prefix-N.tar`` left by an earlier, larger pack into the same folder."""
    stale = []
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        number = path.name[len(prefix) + 1 : -len(".tar")]
        if number.isdigit() and int(number) >= shards:
            path.unlink()
            stale.append(path.name)
    return stale


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
