"""Persistence of a :class:`~modalign.retrieval.index.VectorIndex` directory.

Directory layout::

    index.faiss   the FAISS index (CPU form)
    ids.txt       one item id per line, line i = FAISS row i
    index.json    factory, metric, dim, count, fingerprint, search params, build stats, checksums
    index.ivfdata only for a sharded build: the merged on-disk inverted lists
                  (``faiss.OnDiskInvertedLists``, memory-mapped; see
                  :mod:`~modalign.retrieval.index.sharded`)

Every file listed under ``files`` in index.json (size + sha256) is verified on load.

Writes go through :func:`modalign.core.artifact.atomic_dir`: the files are staged in a temp
sibling, fsynced and renamed over the old directory, so a crash mid-write leaves the previous
index intact. A crash between atomic_dir's two renames leaves the previous index at its
``.old-NAME-PID`` sibling; :func:`resolve_dir` loads it from there and the next save clears it.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss

from modalign.core.artifact import OutputKind, atomic_dir, check_output_dir, sha256_file
from modalign.core.errors import UserInputError

__all__ = [
    "IndexFileError",
    "IndexFingerprintError",
    "has_ondisk_lists",
    "quiet_c_stdout",
    "read_index_dir",
    "save_index_dir",
]

log = logging.getLogger(__name__)

FORMAT = "modalign.vector-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
ONDISK_FILE = "index.ivfdata"
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
    if has_ondisk_lists(cpu_index):
        raise UserInputError(
            f"cannot save a sharded (on-disk) index to {target}: its inverted lists live in "
            f"{ONDISK_FILE} beside the index it was loaded from; rebuild it with "
            "`modalign index build --embeddings DIR --shards N`"
        )
    with atomic_dir(target) as tmp:
        write_files(tmp, cpu_index, ids, meta)
    _clear_previous(target)
    return target


def write_files(
    directory: Path,
    cpu_index: faiss.Index,
    ids: list[str],
    meta: dict[str, Any],
    data_files: tuple[str, ...] = (),
) -> None:
    """The three index files into ``directory`` (atomic_dir fsyncs them before the rename).

    ``data_files``: files the index already wrote beside itself in ``directory`` (the
    ``index.ivfdata`` of an on-disk index), checksummed into index.json with the others.
    """
    index_path = directory / INDEX_FILE
    faiss.write_index(cpu_index, str(index_path))
    files = {INDEX_FILE: file_digest(index_path), IDS_FILE: _write_ids(directory / IDS_FILE, ids)}
    files.update({name: file_digest(directory / name) for name in data_files})
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
    for name in meta["files"]:  # an on-disk index's lists: verified before FAISS maps them
        if name not in (INDEX_FILE, IDS_FILE):
            _verify_file(_data_file(path, name), meta)
    index = _read_index(path / INDEX_FILE, meta, mmap)
    if index.ntotal != len(ids) or index.d != meta["dim"]:
        raise IndexFileError(
            f"{path / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d} but "
            f"{META_FILE} says {len(ids)} of dim {meta['dim']}; rebuild the index"
        )
    return index, ids, meta


def _data_file(directory: Path, name: str) -> Path:
    """``directory / name`` if ``name`` (a key of index.json ``files``) is a plain file name."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise IndexFileError(f"{directory / META_FILE}: bad file name {name!r}; rebuild the index")
    return directory / name


def has_ondisk_lists(index: faiss.Index) -> bool:
    """True for an IVF index whose inverted lists are a ``faiss.OnDiskInvertedLists`` file."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return False
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf.invlists is not None else None
    return isinstance(lists, faiss.OnDiskInvertedLists)


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
    ondisk = ONDISK_FILE in meta["files"]
    if ondisk:
        # its index.ivfdata is the one beside index.faiss, wherever that was written. The
        # lists are memory-mapped anyway; IO_FLAG_MMAP would read index.faiss through a reader
        # that ONDISK_SAME_DIR does not recognise, leaving the lists' old path (a segfault on
        # search), so it is not combined with it.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    try:
        with quiet_c_stdout() if ondisk else contextlib.nullcontext():
            return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise IndexFileError(f"{path} cannot be read by FAISS ({err}); rebuild the index") from err


@contextlib.contextmanager
def quiet_c_stdout() -> Iterator[None]:
    """Send what FAISS's C++ ``printf`` writes to stdout to /dev/null meanwhile.

    FAISS prints progress lines when it opens or resizes on-disk inverted lists
    (``IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ...``), which would corrupt the JSON a
    command prints on stdout. File descriptor 1 is swapped process-wide for the call, so it is
    used only around those calls (an index load, a merge), never around request handling.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file, as recorded in index.json."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
