"""Artifacts on disk: the one crash-safety protocol every modalign writer uses.

Protocol (write): stage into a temp path beside the target (same filesystem), write, ``fsync``
every file, ``rename`` into place, ``fsync`` the parent directory. A reader therefore sees the
old artifact or the new one, never half of either. Metadata files carry ``format`` and
``format_version`` (checked on read) and, for multi-file artifacts, the sha256 of each payload
file, so a torn or tampered artifact is detected on load (:func:`verify_files`).

Permissions follow the process umask like ordinary files (``tempfile`` would give 0600/0700).
:func:`lock_dir` is an advisory exclusive lock on an output directory so two runs never
interleave their writes.

Nothing here imports the rest of modalign; nothing read here is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from modalign.core.errors import ModalignError, UserInputError

LOCK_FILE = ".modalign.lock"
TEMP_PREFIXES = (".tmp-", ".old-")


class ArtifactWriteError(ModalignError, OSError):
    """Writing an artifact failed (disk full, permissions); the old artifact is untouched."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (single syscall pair).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, is_dir: bool) -> None:
    mode = (0o777 if is_dir else 0o666) & ~_umask()
    with suppress(OSError):
        os.chmod(path, mode)


def fsync_dir(path: Path) -> None:
    """fsync a directory entry (makes a rename durable); best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)


def _write_failed(target: Path, exc: OSError) -> ArtifactWriteError:
    what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    return ArtifactWriteError(
        f"{target}: could not write ({what}); nothing was replaced, the previous version (if any) "
        "is intact. Free space or fix permissions and run again"
    )


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces ``final`` as a whole (rename), on error it goes.

    Files and folders created inside get the permissions the umask gives ordinary files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    _chmod_default(tmp, is_dir=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        for f in tmp.rglob("*"):
            if not f.is_symlink():
                _chmod_default(f, is_dir=f.is_dir())
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside ``path``; write it (any library), it is then moved in.

    For writers that want a filename (``faiss.write_index``, ``safetensors.save_file``, tar).
    ``durable=False`` skips the fsyncs (still temp + rename, so readers never see half a file):
    only for files whose loss in a power cut is harmless and whose damage the reader detects
    (decoded-item cache entries carry a checksum; an fsync costs ~20x the write there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        _chmod_default(tmp, is_dir=False)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write a file via temp + fsync + rename so readers never see half of it (``durable``:
    see :func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write strict JSON (NaN/Infinity rejected) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_files(directory: Path, meta_name: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Stage several files that together form an artifact inside an existing ``directory``.

    Yields ``(tmp_dir, meta)``: write the payload files into ``tmp_dir`` and fill ``meta`` (the
    metadata dict). On success each payload file is renamed into ``directory`` and the metadata
    file ``meta_name`` is written last, holding ``files: {name: sha256}`` of every payload file;
    :func:`verify_files` then tells a complete artifact from a torn one (a crash between two
    renames leaves a metadata file whose hashes do not match). Other content of ``directory``
    (e.g. ``checkpoints/``) is left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    with atomic_dir(directory / f".stage-{meta_name}") as tmp:
        yield tmp, meta
        meta["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    staged = directory / f".stage-{meta_name}"
    try:
        for name in meta["files"]:
            os.replace(staged / name, directory / name)
        shutil.rmtree(staged, ignore_errors=True)
        atomic_write_json(directory / meta_name, meta)
    except OSError as exc:
        raise _write_failed(directory, exc) from exc


def verify_files(directory: Path, meta: dict[str, Any], what: str) -> None:
    """Check every payload file listed in ``meta["files"]`` exists with its recorded sha256."""
    for name, digest in (meta.get("files") or {}).items():
        f = Path(directory) / name
        if not f.is_file():
            raise UserInputError(f"{f}: missing from this {what}; it is incomplete, write it again")
        if sha256_file(f) != digest:
            raise UserInputError(
                f"{f}: checksum does not match this {what}'s metadata (torn write or edited "
                "file); write it again"
            )


def write_meta(path: Path, format: str, version: int, data: dict[str, Any]) -> None:
    """Write a metadata JSON marking a directory as ``format`` (atomic, strict JSON)."""
    atomic_write_json(Path(path), {"format": format, "format_version": version, **data})


def read_json_meta(
    path: Path,
    what: str,
    fix: str,
    format: str | None = None,
    max_version: int | None = None,
) -> dict[str, Any]:
    """Read a metadata JSON file that marks a directory as ``what``.

    Missing or corrupt -> :class:`UserInputError` naming the file and ``fix`` (how to get one).
    With ``format``, the file must declare it; with ``max_version``, a newer format version
    (written by a newer modalign) is refused naming both versions.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path.parent}: not a {what} (no {path.name}); {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: corrupt {what} metadata ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: corrupt {what} metadata (not a JSON object); {fix}")
    if format is not None and data.get("format") != format:
        raise UserInputError(
            f"{path}: format {data.get('format')!r} is not a {what} ({format}); {fix}"
        )
    if max_version is not None:
        version = data.get("format_version")
        if not isinstance(version, int) or version > max_version:
            raise UserInputError(
                f"{path}: {what} format version {version!r} is newer than this modalign reads "
                f"({max_version}); upgrade modalign"
            )
    return data


def remove_stale_temp(directory: Path) -> list[Path]:
    """Delete temp files/dirs left by a writer killed mid-write (call under :func:`lock_dir`)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for d in directory.iterdir():
        if d.name.startswith((*TEMP_PREFIXES, ".stage-")):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            removed.append(d)
    return removed


class DirectoryLocked(UserInputError):
    """Another process holds the output directory's lock."""


@contextmanager
def lock_dir(directory: Path, what: str = "output directory") -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``directory`` (created if needed) for a whole run.

    A second writer fails at once (exit 2) naming the directory and the holder's pid, instead of
    interleaving its files with the first one's. The lock dies with its process (``flock``), so
    a killed run never leaves a stale lock behind. Re-entrant within one process.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield directory
        finally:
            _HELD[key] -= 1
        return
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryLocked(
                f"{directory}: another modalign process (pid {holder}) is writing this {what}; "
                "wait for it to finish or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = 1
        try:
            yield directory
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_HELD: dict[str, int] = {}
