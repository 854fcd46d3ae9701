"""``modalign data pack SRC --out DIR``: a manifest -> WebDataset shards, for any modality.

Each row becomes one sample: per modality the member its spec's :meth:`ModalitySpec.pack` gives
(file modalities: the original bytes under their own extension; inline ones: UTF-8), plus
``KEY.cls`` (the label) and ``KEY.json`` (``id``, ``label``, source line). Every value is
decoded once to check it; a bad modality is left out of its sample and counted, a row with
nothing usable is skipped. Manifest columns that are no registered modality are reported
(``unknown_columns``), never dropped silently.

Crash safety (:mod:`modalign.core.artifact`): the output folder is locked for the whole run,
each shard is written under a temporary name and renamed when complete, and ``index.json``
(per-shard sample counts) is written last, atomically.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from modalign.core.artifact import (
    OutputKind,
    atomic_path,
    output_dir,
    remove_stale_temp,
    write_meta,
)
from modalign.core.errors import ConfigError, DataError
from modalign.data.config import DataConfig
from modalign.data.decode import BadItem
from modalign.data.manifest import Manifest, ManifestRow, is_manifest, read_manifest
from modalign.data.modality import MODALITIES, ModalitySpec, modality_specs

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT, INDEX_VERSION = "modalign.shards", 1
SHARDS_KIND = OutputKind(INDEX_FORMAT, "shard folder", ((INDEX_FILE, INDEX_FORMAT),))
META_MEMBERS = ("json", "cls")


def pack_shards(
    src: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    cfg: DataConfig | None = None,
    max_examples: int = 20,
    specs: Mapping[str, ModalitySpec] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/{prefix}-000000.tar ...`` with ``shard_size`` samples each.

    ``specs`` default to every registered modality (built-ins and installed plugins); those
    that the manifest uses must have distinct member extensions (ConfigError). Returns
    ``{"pattern", "shards", "items", "written", "bad", "bad_by_reason", "examples", "out",
    "removed_stale", "modalities", "unknown_columns"}``: ``pattern`` is the brace pattern to pass
    as SRC, ``items`` the manifest's rows, ``written`` the samples packed, ``bad`` the rows dropped
    entirely (``bad_by_reason`` counts every problem, including modalities dropped from kept
    rows). ``index.json`` holds the same plus per-shard ``counts``. Raises :class:`DataError` for
    an unusable manifest or a non-positive ``shard_size``.
    """
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    # Claimed before the manifest is read: a second pack into the folder stops here (exit 2).
    with output_dir(out_dir, SHARDS_KIND, "--out") as out:
        manifest, specs = _read(src, specs, cfg)
        remove_stale_temp(out)
        tally = _Tally(manifest, max_examples)
        with _ShardWriter(out, prefix, shard_size) as writer:
            for row in manifest.rows:
                members = tally.members(row, specs)
                if members is None:
                    continue
                writer.add(members)
        stale = _remove_stale(out, prefix, len(writer.counts))
        result = {
            "out": str(out),
            "pattern": writer.pattern(),
            "shards": len(writer.counts),
            **tally.result(),
            "written": sum(writer.counts),
            "removed_stale": stale,
            "modalities": {m: list(s.member_extensions()) for m, s in specs.items()},
            "unknown_columns": manifest.unknown_columns,
        }
        write_meta(
            out / INDEX_FILE, INDEX_FORMAT, INDEX_VERSION, {**result, "counts": writer.counts}
        )
    return result


def _read(
    src: str | Path, specs: Mapping[str, ModalitySpec] | None, cfg: DataConfig | None
) -> tuple[Manifest, dict[str, ModalitySpec]]:
    """The manifest and the specs of the modalities it uses (extensions checked)."""
    if not is_manifest(src):
        raise DataError(
            f"{src}: data pack reads a manifest (.jsonl/.csv/.parquet); shards are already packed "
            "and every command reads them as they are"
        )
    specs = dict(specs) if specs is not None else modality_specs(MODALITIES.names(), cfg)
    manifest = read_manifest(src, specs)
    specs = {m: s for m, s in specs.items() if m in manifest.modalities}  # the ones in use
    _check_extensions(specs)
    if manifest.unknown_columns:
        log.warning(
            "%s: columns %s are no registered modality; not packed", src, manifest.unknown_columns
        )
    return manifest, specs


def _check_extensions(specs: Mapping[str, ModalitySpec]) -> None:
    owner: dict[str, str] = {}
    for name, spec in specs.items():
        for ext in spec.member_extensions():
            if ext in META_MEMBERS or owner.get(ext, name) != name:
                other = owner.get(ext, "shard metadata")
                raise ConfigError(
                    f"modality {name!r}: member extension {ext!r} is already used by {other}; "
                    "give the modality its own extensions"
                )
            owner[ext] = name


class _Tally:
    """Rows read, dropped and the problems found while packing."""

    def __init__(self, manifest: Manifest, max_examples: int) -> None:
        self.manifest, self.max_examples = manifest, max_examples
        self.reasons: Counter = Counter(manifest.skipped)
        self.examples = list(manifest.skipped_examples)[:max_examples]
        self.dropped = sum(manifest.skipped.values())

    def members(
        self, row: ManifestRow, specs: Mapping[str, ModalitySpec]
    ) -> dict[str, bytes] | None:
        """Tar member suffix -> bytes for ``row``; None (and counted) when nothing is usable."""
        members: dict[str, bytes] = {}
        for modality, value in row.values.items():
            spec = specs[modality]
            try:
                ext, data = spec.pack(value)
            except BadItem as exc:
                origin = value if isinstance(value, str) else f"<{len(value)}-byte cell>"
                if exc.detail != origin and not spec.inline:
                    exc = BadItem(exc.reason, f"{origin}: {exc.detail}" if exc.detail else origin)
                self._problem(row, modality, exc)
                continue
            members[ext] = data
        if not members:
            self.dropped += 1
            return None
        members["json"] = json.dumps({"id": row.id, "label": row.label, "line": row.line}).encode()
        if row.label is not None:
            members["cls"] = row.label.encode()
        return members

    def _problem(self, row: ManifestRow, modality: str, exc: BadItem) -> None:
        self.reasons[exc.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{self.manifest.path}:{row.line} [{modality}] {exc}")

    def result(self) -> dict[str, Any]:
        return {
            "items": len(self.manifest.rows) + sum(self.manifest.skipped.values()),
            "bad": self.dropped,
            "bad_by_reason": dict(self.reasons.most_common()),
            "examples": self.examples,
        }


class _ShardWriter:
    """Rolls samples into fixed-size shards, each staged by :func:`atomic_path` then renamed."""

    def __init__(self, out: Path, prefix: str, shard_size: int) -> None:
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._stage: AbstractContextManager[Path] | None = None
        self._n = 0

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self._tar is None:
            return
        if kind is None:
            self._finish()
            return
        self._tar.close()  # a failed pack leaves no shard under a final name
        assert self._stage is not None
        self._stage.__exit__(kind, exc, tb)
        self._tar = self._stage = None

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def pattern(self) -> str:
        last = max(len(self.counts) - 1, 0)
        if last == 0:
            return str(self.out / self._name(0))
        return str(self.out / f"{self.prefix}-{{{0:06d}..{last:06d}}}.tar")

    def add(self, members: Mapping[str, bytes]) -> None:
        if self._tar is None:
            self._stage = atomic_path(self.out / self._name(len(self.counts)))
            # Closed in _finish once the shard is full (or at the end): it spans many add() calls.
            self._tar = tarfile.open(self._stage.__enter__(), "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
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

    def _finish(self) -> None:
        assert self._tar is not None and self._stage is not None
        self._tar.close()
        self._stage.__exit__(None, None, None)  # fsync + rename into place
        self.counts.append(self._n)
        self._tar, self._stage, self._n = None, None, 0


def _remove_stale(out: Path, prefix: str, shards: int) -> list[str]:
    """Delete ``prefix-N.tar`` left by an earlier, larger pack into the same folder."""
    stale = []
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        number = path.name[len(prefix) + 1 : -len(".tar")]
        if number.isdigit() and int(number) >= shards:
            path.unlink()
            stale.append(path.name)
    return stale
