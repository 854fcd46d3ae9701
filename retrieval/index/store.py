"""Persistence of a :class:`~modalign.retrieval.index.VectorIndex` directory.

Directory layout::

    index.faiss   the FAISS index (CPU form)
    ids.txt       one item id per line, line i = FAISS row i
    index.json    factory, metric, dim, count, fingerprint, search params, build stats, checksums

Writes go through :func:`modalign.core.artifact.atomic_dir`: the files are staged in a temp
sibling, fsynced and renamed over the old directory, so a crash mid-write leaves the previous
index intact. A crash between atomic_dir's two renames leaves the previous index at its
``.old-NAME-PID`` sibling; :func:`resolve_dir` loads it from there and the next save clears it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import faiss

from modalign.core.artifact import OutputKind, atomic_dir, check_output_dir, sha256_file
from modalign.core.errors import UserInputError

__all__ = ["IndexFileError", "IndexFingerprintError", "read_index_dir", "save_index_dir"]

log = logging.getLogger(__name__)

FORMAT = "modalign.vector-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
META_FILE = "index.json"
VECTOR_INDEX_KIND = OutputKind(FORMAT, "vector index", ((META_FILE, FORMAT),))


class IndexFileError(UserInputError):
    """An index directory is missing, incomplete or corrupt."""


class IndexFingerprintError(UserInputError):
    """The index was built with a different model than the one asked for."""


def save_index_dir(
    target: Path, cpu_index: faiss.Index, ids: list[str], meta: dict[str, Any]
) -> Path:
    """Write ``cpu_index``, ``ids`` and ``meta`` (+ format version, checksums) as one directory."""
    target = Path(target)
    # Checked, not locked: one atomic swap with no long work before it. Commands lock the
    # folder above (a corpus index), whose writer owns this one.
    check_output_dir(target, VECTOR_INDEX_KIND, "index directory")
    with atomic_dir(target) as tmp:
        write_files(tmp, cpu_index, ids, meta)
    _clear_previous(target)
    return target


def write_files(
    directory: Path,
    cpu_index: faiss.Index,
    ids: list[str],
    meta: dict[str, Any],
) -> None:
    """The three index files into ``directory`` (atomic_dir fsyncs them before the rename)."""
    index_path = directory / INDEX_FILE
    faiss.write_index(cpu_index, str(index_path))
    files = {INDEX_FILE: file_digest(index_path), IDS_FILE: _write_ids(directory / IDS_FILE, ids)}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files}
    _write_bytes(directory / META_FILE, json.dumps(full, indent=2).encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)  # durability: atomic_dir fsyncs the staged tree before renaming


def _write_ids(path: Path, ids: list[str], batch: int = 65_536) -> dict[str, Any]:
    """ids.txt written and hashed a batch at a time (no second copy of every id in memory)."""
    digest, size = hashlib.sha256(), 0
    with path.open("wb") as fh:
        for start in range(0, len(ids), batch):
            data = "".join(f"{i}\n" for i in ids[start : start + batch]).encode("utf-8")
            fh.write(data)
            digest.update(data)
            size += len(data)
    return {"bytes": size, "sha256": digest.hexdigest()}


def read_index_dir(
    directory: Path, expected_fingerprint: str | None, mmap: bool = False
) -> tuple[faiss.Index, list[str], dict[str, Any]]:
    """(CPU index, ids, metadata) of a saved index, every file verified against index.json.

    ``mmap=True`` maps ``index.faiss`` read-only (``IO_FLAG_MMAP | IO_FLAG_READ_ONLY``): the
    codes stay in the page cache, shared by every process that maps the same file.
    """
    path = resolve_dir(Path(directory))
    meta = read_meta(path / META_FILE)
    check_fingerprint(path, meta, expected_fingerprint)
    ids = _read_ids(path / IDS_FILE, meta)
    index = _read_index(path / INDEX_FILE, meta, mmap)
    if index.ntotal != len(ids) or index.d != meta["dim"]:
        raise IndexFileError(
            f"{path / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d} but "
            f"{META_FILE} says {len(ids)} of dim {meta['dim']}; rebuild the index"
        )
    return index, ids, meta


def _previous(target: Path) -> list[Path]:
    """Old copies atomic_dir set aside (``.old-NAME-PID``), newest first."""
    olds = target.parent.glob(f".old-{glob.escape(target.name)}-*")
    return sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True)


def _clear_previous(target: Path) -> None:
    for old in _previous(target):
        shutil.rmtree(old, ignore_errors=True)


def resolve_dir(path: Path) -> Path:
    """The index directory, or the previous one if a crash hit between the renames of a save."""
    if (path / META_FILE).exists():
        return path
    if not path.exists():
        for old in _previous(path):
            if (old / META_FILE).exists():
                log.warning("%s missing; loading the previous index from %s", path, old)
                return old
    if not path.is_dir():
        raise IndexFileError(
            f"index directory {path} does not exist; build it with `modalign index build`"
        )
    raise IndexFileError(
        f"{path / META_FILE} is missing: {path} is not a complete index; rebuild it with "
        "`modalign index build`"
    )


def read_meta(path: Path) -> dict[str, Any]:
    """index.json, checked for format version and required keys (IndexFileError if not)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {meta.get('format_version')!r}")
        for key in ("factory", "metric", "dim", "count", "fingerprint", "files"):
            if key not in meta:
                raise ValueError(f"missing key {key!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise IndexFileError(f"{path} is unreadable or corrupt ({err}); rebuild the index") from err
    return meta


def check_fingerprint(path: Path, meta: dict[str, Any], expected: str | None) -> None:
    """IndexFingerprintError unless ``expected`` is None or equals the recorded fingerprint."""
    if expected is not None and meta["fingerprint"] != expected:
        raise IndexFingerprintError(
            f"index {path} was built by another model (fingerprint {meta['fingerprint']!r}, "
            f"expected {expected!r}); rebuild it with the current model or pass the matching "
            "model"
        )


def _verify_file(path: Path, meta: dict[str, Any]) -> None:
    expected = meta["files"].get(path.name)
    if not path.is_file():
        raise IndexFileError(f"{path} is missing; rebuild the index")
    if expected is None or file_digest(path) != expected:
        raise IndexFileError(
            f"{path} is corrupt or truncated (size/checksum differ from {META_FILE}); "
            "rebuild the index"
        )


def _read_ids(path: Path, meta: dict[str, Any]) -> list[str]:
    _verify_file(path, meta)
    ids = path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(ids) != meta["count"]:
        raise IndexFileError(f"{path} has {len(ids)} ids, expected {meta['count']}; rebuild")
    return ids


def _read_index(path: Path, meta: dict[str, Any], mmap: bool = False) -> faiss.Index:
    _verify_file(path, meta)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise IndexFileError(f"{path} cannot be read by FAISS ({err}); rebuild the index") from err


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file, as recorded in index.json."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
