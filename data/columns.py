"""One rule per manifest column, the same for JSONL, CSV and Parquet.

=========  ===================================================================================
column     rule
=========  ===================================================================================
``id``     a non-empty string (kept verbatim) or an integer (written in decimal). Absent, null
           or ``""``: the row's own ``<folder>:<line>``. Anything else (a float, a boolean, a
           list, an object), or a string holding a control character (newline, tab, NUL...),
           a line/paragraph separator or a lone surrogate, is an error naming the row: ids
           are written one per line into indexes and embedding shards.
``label``  a string (kept verbatim) or an integer; an integral float (``1.0``) is the integer
           (``"1"``), so ``1`` and ``1.0`` are one class. Absent, null, ``""`` or only
           whitespace: unlabeled, in every format. A boolean, a fractional float, a list or an
           object is an error naming the row.
inline     (``text``) a string; a number is its decimal text. Absent, null or ``""``: the row
           lacks that modality. A boolean, a list of captions or an object is an error naming
           the row; write one row per caption. A string that is only whitespace is a counted
           ``empty_text`` bad item when decoded.
media      (``image``, ``audio``, ...) a path string, relative to the manifest's folder unless
           absolute; in Parquet also a bytes cell (the file's bytes, decoded as media) or a
           ``{"bytes": ..., "path": ...}`` struct as Hugging Face ``datasets`` writes for
           images (bytes win when both are set). Absent, null or ``""``: the row lacks that
           modality. Anything else is an error naming the row. A path that does not exist, is
           unreadable or loops (symlinks) is a counted bad item when decoded, never an abort.
=========  ===================================================================================

A wrong *type* is a mistake in how the manifest was written (it repeats on every row), so it
fails up front naming ``file:line`` and the column; bad *content* (a missing or corrupt file,
an empty caption) is one bad item, counted and skipped.
"""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Any

from modalign.core.errors import DataError


def is_empty(value: Any) -> bool:
    """Absent in every format: None, NaN (pandas writes it for nulls) or the empty string."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def id_cell(value: Any, where: str, default: str) -> str:
    """The row id under the ``id`` rule (``default`` when the cell is empty)."""
    if is_empty(value):
        return default
    if isinstance(value, str):
        bad = next((c for c in value if unicodedata.category(c) in _BAD_ID_CHARS), None)
        if bad is not None:
            raise DataError(
                f"{where}: id {value!r} contains {_char_name(bad)}; an id is one line of "
                "printable text (ids are stored one per line): fix the id in the manifest"
            )
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: id {value!r} is a {_kind(value)}; an id is a string or an integer "
        "(quote it in JSON, or leave it out to use the row's file:line)"
    )


_BAD_ID_CHARS = {"Cc", "Cs", "Zl", "Zp"}  # control, lone surrogate, line/paragraph separator


def _char_name(c: str) -> str:
    kind = "a lone surrogate" if unicodedata.category(c) == "Cs" else "a control character"
    return f"the character U+{ord(c):04X} ({unicodedata.name(c, kind)})"


def label_cell(value: Any, where: str) -> str | None:
    """The row label under the ``label`` rule (None = unlabeled)."""
    if is_empty(value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataError(
        f"{where}: label {value!r} is a {_kind(value)}; a label is a string or an integer "
        '(write true/false or fractional values as strings, e.g. "yes")'
    )


def inline_cell(value: Any, where: str, column: str) -> Any:
    """An inline (text) cell: a string or a number, or bytes decoded as UTF-8 (Parquet binary)."""
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: column {column!r} holds a {_kind(value)} ({_short(value)}); {column} must be "
        "a string (for several captions write one row per caption)"
    )


def media_cell(value: Any, where: str, column: str, root: Path) -> str | bytes | None:
    """A media cell: an absolute path string, or the media's bytes; None when the cell is empty."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        blob, path = value.get("bytes"), value.get("path")
        value = blob if not is_empty(blob) else path
        if is_empty(value):
            return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        # abspath, not resolve(): no symlink is followed here, so a loop is one bad item at
        # decode time instead of a RuntimeError that aborts the whole read.
        return value if os.path.isabs(value) else os.path.abspath(os.path.join(root, value))
    raise DataError(
        f"{where}: column {column!r} holds a {_kind(value)} ({_short(value)}); a media cell is "
        "a path string (relative to the manifest) or, in Parquet, the file's bytes"
    )


def _kind(value: Any) -> str:
    return {bool: "boolean", float: "number", int: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
