"""Checks a run makes on its sources before any work: every path exists and parses, ids are
unique where they must be, and ``pipe:`` sources come only from the user.

Model building, output folders and long loops come after these, so a typo in ``data.val``
fails in the first second naming the key and the path, not after training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError, DataError
from modalign.data.manifest import ManifestRow, is_manifest, read_manifest
from modalign.data.shards import SHARD_SUFFIXES, expand_shards, folder_shards, is_shard_pattern

PIPE_PREFIX = "pipe:"


@dataclass
class SourceCheck:
    """What :func:`check_source` found: the files behind a source and its manifest rows."""

    key: str
    files: list[str] = field(default_factory=list)
    rows: int = 0  # manifest rows read (0 for shards: counting them means reading them)
    duplicates: dict[str, list[int]] = field(default_factory=dict)  # id -> manifest lines


def check_source(
    src: str | Path | Mapping[str, float],
    modalities: Sequence[str],
    key: str,
    unique_ids: bool = False,
) -> SourceCheck:
    """Check ``src`` (the value of config key ``key``) without decoding any item.

    A manifest is read (missing, malformed, a wrong-typed cell, no usable row: DataError); a
    shard pattern is expanded and every local shard must exist; a folder must hold shards; a
    ``{SRC: weight}`` mix checks each. The error names ``key``. ``unique_ids``: a manifest with
    duplicate ids is an error naming the first ids and their lines (index build needs unique
    ids; training does not, so the duplicates are only reported there).
    """
    result = SourceCheck(key)
    if not src:
        raise DataError(f"{key} is empty; set it to a manifest, shard pattern or folder of shards")
    sources = list(src) if isinstance(src, Mapping) else [str(src)]
    for one in sources:
        try:
            _check_one(str(one), modalities, result)
        except DataError as exc:
            text = str(exc)
            raise DataError(text if text.startswith(f"{key}") else f"{key}: {text}") from None
    if unique_ids and result.duplicates:
        raise DataError(f"{key}: {describe_duplicates(result.duplicates)}")
    return result


def _check_one(src: str, modalities: Sequence[str], result: SourceCheck) -> None:
    if is_shard_pattern(src):
        result.files.extend(expand_shards(src))
    elif is_manifest(src):
        manifest = read_manifest(src, list(modalities))
        result.files.append(src)
        result.rows += len(manifest.rows)
        result.duplicates.update(duplicate_ids(manifest.rows))
    elif Path(src).is_dir():
        shards = folder_shards(Path(src))  # a recorded shard that is gone: DataError
        if not shards:
            raise DataError(f"{src}: folder holds no shards ({'/'.join(SHARD_SUFFIXES)})")
        result.files.extend(shards)
    elif not Path(src).exists():
        raise DataError(f"{src}: not found; pass an existing manifest, shard pattern or folder")
    else:
        raise DataError(
            f"{src}: not a manifest (.jsonl/.csv/.parquet), a WebDataset shard pattern "
            f"({'/'.join(SHARD_SUFFIXES)}) or a folder of shards"
        )


def duplicate_ids(rows: Iterable[ManifestRow]) -> dict[str, list[int]]:
    """Ids that occur more than once -> the manifest lines they occur on (in file order)."""
    lines: dict[str, list[int]] = {}
    for row in rows:
        lines.setdefault(row.id, []).append(row.line)
    return {i: ls for i, ls in lines.items() if len(ls) > 1}


def describe_duplicates(duplicates: Mapping[str, Sequence[int]], limit: int = 5) -> str:
    """``"3 ids occur more than once: 'a' (lines 1, 4), ..."`` for an error message."""
    shown = ", ".join(
        f"{i!r} (lines {', '.join(map(str, ls[:5]))}{', ...' if len(ls) > 5 else ''})"
        for i, ls in list(duplicates.items())[:limit]
    )
    more = f" and {len(duplicates) - limit} more" if len(duplicates) > limit else ""
    return (
        f"{len(duplicates)} id(s) occur more than once: {shown}{more}; ids must be unique "
        "(rename the rows, or drop the id column to use each row's file:line)"
    )


def refuse_pipe(tree: Any, where: str, path: str = "") -> None:
    """ConfigError when any string in ``tree`` (a config mapping, list or value read from a
    file the user did not write: a bundle's or checkpoint's config, a server request) is a
    ``pipe:`` source, which would run a shell command. Users who mean it type it themselves
    (``--set data.train='pipe:...'``)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            refuse_pipe(k, where, path)
            refuse_pipe(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            refuse_pipe(v, where, f"{path}[{i}]")
    elif isinstance(tree, str) and tree.strip().startswith(PIPE_PREFIX):
        raise ConfigError(
            f"{where}: {path or 'value'} is a {PIPE_PREFIX} source ({tree[:60]!r}), which runs a "
            "shell command; it is refused in configs read from bundles, checkpoints and "
            "requests. Type it yourself if you mean it: --set KEY='pipe:...'"
        )
