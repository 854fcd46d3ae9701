"""Small file helpers shared by every layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modalign.data.errors import UserInputError


def read_json_meta(path: Path, what: str, fix: str) -> dict[str, Any]:
    """Read a metadata JSON file that marks a directory as ``what``.

    Missing or corrupt -> :class:`UserInputError` naming the file and ``fix`` (how to get one).
    """
    if not path.is_file():
        raise UserInputError(f"{path.parent}: not a {what} (no {path.name}); {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: corrupt {what} metadata ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: corrupt {what} metadata (not a JSON object); {fix}")
    return data
