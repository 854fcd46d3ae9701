"""Manifests: JSONL, CSV or Parquet tables of paired items.

Columns: ``id``, one column per modality (``image``, ``audio`` are paths relative to the
manifest; ``text`` is inline), optional ``label``. Any subset of modalities per row. A
malformed file fails at once naming file and line; a row without any modality is skipped and
counted, never fatal.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modalign.data.errors import DataError

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
RESERVED_COLUMNS = ("id", "label")


@dataclass
class ManifestRow:
    """One paired item. ``values[m]`` is an absolute path (file modalities) or inline text."""

    id: str
    values: dict[str, str]
    label: str | None = None
    line: int = 0  # 1-based line (JSONL/CSV data line) or row number (Parquet)


@dataclass
class Manifest:
    path: Path
    rows: list[ManifestRow]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped at read time
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def modalities(self) -> list[str]:
        return sorted({m for r in self.rows for m in r.values})


def is_manifest(src: str | Path) -> bool:
    return Path(src).suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(
    path: str | Path, modalities: Sequence[str], inline: Iterable[str] = ("text",)
) -> Manifest:
    """Read a manifest, keeping the given modality columns.

    Raises :class:`DataError` (naming file and line) for a missing/malformed file or when no row
    has any of ``modalities``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; pass an existing .jsonl/.csv/.parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path, modalities)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown manifest type {suffix!r}; use one of {MANIFEST_SUFFIXES}")
    manifest = Manifest(path=path, rows=[])
    inline = set(inline)
    for line, record in records:
        row = _make_row(record, line, path.parent, modalities, inline)
        if row is None:
            manifest.skipped["no_modality"] = manifest.skipped.get("no_modality", 0) + 1
            if len(manifest.skipped_examples) < 5:
                manifest.skipped_examples.append(
                    f"{path}:{line}: row has none of {list(modalities)}"
                )
            continue
        manifest.rows.append(row)
    if not manifest.rows:
        raise DataError(
            f"{path}: no usable rows (none has any of the columns {list(modalities)}); "
            "each row needs at least one modality value"
        )
    return manifest


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((line_no, record))
    return records


def _read_csv(path: Path, modalities: Sequence[str]) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if not set(header) & set(modalities):
            raise DataError(
                f"{path}:1: header {header} has none of the modality columns {list(modalities)}"
            )
        records = []
        for record in reader:
            line = reader.line_num
            if None in record or any(v is None for v in record.values()):
                raise DataError(
                    f"{path}:{line}: row has {len([v for v in record.values() if v is not None])} "
                    f"fields but the header has {len(header)}; fix the row's commas/quoting"
                )
            records.append((line, {k: v for k, v in record.items() if v != ""}))
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet ({exc})") from None
    rows = table.to_pylist()
    return [(i + 1, {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)]


def _make_row(
    record: dict, line: int, root: Path, modalities: Sequence[str], inline: set[str]
) -> ManifestRow | None:
    values: dict[str, str] = {}
    for m in modalities:
        raw = record.get(m)
        if raw is None or (isinstance(raw, str) and raw == "" and m not in inline):
            continue
        if m in inline:
            values[m] = raw if isinstance(raw, str) else str(raw)
        else:
            values[m] = (
                str((root / str(raw)).resolve()) if not Path(str(raw)).is_absolute() else str(raw)
            )
    if not values:
        return None
    label = record.get("label")
    return ManifestRow(
        id=str(record.get("id", f"{root.name}:{line}")),
        values=values,
        label=None if label is None else str(label),
        line=line,
    )
