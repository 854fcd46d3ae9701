"""Manifests: JSONL, CSV or Parquet tables of paired items.

Columns: ``id``, one column per modality (``image``, ``audio`` are paths relative to the
manifest; ``text`` is inline), optional ``label`` (one rule per column: :mod:`modalign.data.columns`). Any subset of
modalities per row. A malformed file (an unterminated CSV quote included) fails at once
naming file and line; a row without any modality is skipped and
counted, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError, DataError
from modalign.data.columns import id_cell, inline_cell, is_empty, label_cell, media_cell
from modalign.data.modality import MODALITIES, RESERVED_COLUMNS, modality_specs

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Manifest columns (and batch fields) that are never modalities; a modality may not use them.


@dataclass(slots=True)  # slots: millions of rows stay small in every DataLoader worker
class ManifestRow:
    """One paired item. ``values[m]`` is an absolute path or the media's bytes (file
    modalities), or inline text; see :mod:`modalign.data.columns` for each column's rule."""

    id: str
    values: dict[str, str | bytes]
    label: str | None = None
    line: int = 0  # 1-based line (JSONL/CSV data line) or row number (Parquet)


@dataclass
class Manifest:
    """Rows read from one manifest file, plus what was skipped while reading it."""

    path: Path
    rows: list[ManifestRow]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped at read time
    skipped_examples: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # every column seen, in first-seen order
    wanted: tuple[str, ...] = ()  # the modality columns asked for

    @property
    def unknown_columns(self) -> list[str]:
        """Columns that are neither reserved nor one of the modalities read."""
        return [c for c in self.columns if c not in RESERVED_COLUMNS and c not in self.wanted]

    @property
    def modalities(self) -> list[str]:
        return sorted({m for r in self.rows for m in r.values})


def is_manifest(src: str | Path) -> bool:
    """True when ``src`` has a manifest suffix (.jsonl, .csv, .parquet)."""
    return Path(src).suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(
    path: str | Path,
    modalities: Sequence[str] | Mapping[str, Any],
    inline: Iterable[str] | None = None,
) -> Manifest:
    """Read a manifest, keeping the given modality columns.

    ``modalities`` are names or a ``{name: ModalitySpec}`` mapping. Inline columns (values kept
    as they are, not resolved as paths) are ``inline`` when given, else those whose spec is
    ``inline`` (for names: the registered modality's spec). Raises :class:`DataError` (naming file and line) for a missing/malformed file or when no row
    has any of ``modalities``.
    """
    reserved = [m for m in modalities if m in RESERVED_COLUMNS]
    if reserved:
        raise ConfigError(
            f"modality {reserved[0]!r} is named like the reserved column {reserved[0]!r} "
            f"(reserved: {', '.join(RESERVED_COLUMNS)}); rename the modality"
        )
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
    inline = set(_inline_names(modalities) if inline is None else inline)
    modalities = list(modalities)
    manifest = Manifest(path=path, rows=[], wanted=tuple(modalities))
    seen: dict[str, None] = {}
    for line, record in records:
        seen.update(dict.fromkeys(record))
        row = _make_row(record, line, path, modalities, inline)
        if row is None:
            manifest.skipped["no_modality"] = manifest.skipped.get("no_modality", 0) + 1
            if len(manifest.skipped_examples) < 5:
                manifest.skipped_examples.append(
                    f"{path}:{line}: row has none of {list(modalities)}"
                )
            continue
        manifest.rows.append(row)
    manifest.columns = list(seen)
    if not manifest.rows:
        raise DataError(
            f"{path}: no usable rows (none has any of the columns {list(modalities)}); "
            "each row needs at least one modality value"
        )
    return manifest


def _inline_names(modalities: Sequence[str] | Mapping[str, Any]) -> list[str]:
    if isinstance(modalities, Mapping):
        return [m for m, spec in modalities.items() if spec.inline]
    known = [m for m in modalities if m in MODALITIES]
    return [m for m, spec in modality_specs(known).items() if spec.inline]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    # Binary read + per-line decode: a bad byte then names its line instead of aborting the read.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            line = _decode_line(path, line_no, raw)
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


def _decode_line(path: Path, line_no: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "save the manifest as UTF-8"
        ) from None
    return text.removeprefix("\ufeff") if line_no == 1 else text


def _read_csv(path: Path, modalities: Collection[str]) -> list[tuple[int, dict]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # utf-8-sig: Excel writes a BOM
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason}); save as UTF-8") from None
    try:
        return _parse_csv(path, text, modalities)
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None


def _parse_csv(path: Path, text: str, modalities: Collection[str]) -> list[tuple[int, dict]]:
    with io.StringIO(text, newline="") as fh:
        # strict: an unterminated quote is an error instead of a field that swallows every
        # following row up to the end of the file.
        reader = csv.DictReader(fh, strict=True)
        header = reader.fieldnames or []
        if not set(header) & set(modalities):
            raise DataError(
                f"{path}:1: header {header} has none of the modality columns {list(modalities)}"
            )
        records = []
        while True:
            start = reader.line_num + 1  # the record's first line (a quoted field may span lines)
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(
                    f"{path}:{start}: malformed CSV in the row starting here ({exc}); check its "
                    'quotes: close every quoted field and write a quote inside one as ""'
                ) from None
            line = reader.line_num
            # DictReader files surplus fields under None and fills missing ones with None.
            if None in record or any(v is None for v in record.values()):
                extra = record.pop(None, None) or []
                fields = sum(v is not None for v in record.values()) + len(extra)
                raise DataError(
                    f"{path}:{line}: row has {fields} fields but the header has {len(header)} "
                    f"({', '.join(map(str, header))}); fix the row's commas/quoting"
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
    record: dict, line: int, path: Path, modalities: Sequence[str], inline: set[str]
) -> ManifestRow | None:
    """One row under the column rules of :mod:`modalign.data.columns`."""
    where, root = f"{path}:{line}", path.parent
    values: dict[str, str | bytes] = {}
    for m in modalities:
        raw = record.get(m)
        if is_empty(raw):
            continue
        if m in inline:
            values[m] = inline_cell(raw, where, m)
        elif (cell := media_cell(raw, where, m, root)) is not None:
            values[m] = cell
    if not values:
        return None
    return ManifestRow(
        id=id_cell(record.get("id"), where, f"{root.name}:{line}"),
        values=values,
        label=label_cell(record.get("label"), where),
        line=line,
    )
