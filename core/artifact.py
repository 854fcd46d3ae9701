"""Artifacts on disk: the one crash-safety protocol every modalign writer uses.

Protocol (write): stage into a temp path beside the target (same filesystem), write, ``fsync``
every file, ``rename`` into place, ``fsync`` the parent directory. A reader therefore sees the
old artifact or the new one, never half of either. Metadata files carry ``format`` and
``format_version`` (checked on read) and, for multi-file artifacts, the sha256 of each payload
file, so a torn or tampered artifact is detected on load (:func:`verify_files`).

Permissions follow the process umask like ordinary files (``tempfile`` would give 0600/0700).
:func:`lock_dir` is an advisory exclusive lock on an output directory so two runs never
interleave their writes; :func:`output_dir` is the one way a command claims its output folder
(checked, then locked from the first check to the final rename; see :class:`OutputKind`).

Nothing here imports the rest of modalign; nothing read here is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError, ModalignError, UserInputError

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
        _carry_lock(final, tmp)
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


def _carry_lock(final: Path, tmp: Path) -> None:
    """Hard-link ``final``'s lock file into ``tmp`` before the swap: the new directory then holds
    the very file (inode) the writer has locked, so the lock outlives the rename and a second
    writer arriving after the swap is still refused (a fresh lock file would be free)."""
    lock = final / LOCK_FILE
    if lock.is_file() and not (tmp / LOCK_FILE).exists():
        os.link(lock, tmp / LOCK_FILE)


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
def atomic_files(
    directory: Path, meta_name: str, seal: bool = False
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Stage several files that together form an artifact inside an existing ``directory``.

    Yields ``(tmp_dir, meta)``: write the payload files into ``tmp_dir`` and fill ``meta`` (the
    metadata dict). On success each payload file is renamed into ``directory`` and the metadata
    file ``meta_name`` is written last, holding ``files: {name: sha256}`` of every payload file;
    :func:`verify_files` then tells a complete artifact from a torn one (a crash between two
    renames leaves a metadata file whose hashes do not match). Other content of ``directory``
    (e.g. ``checkpoints/``) is left alone. ``seal``: the metadata also carries its own sha256
    (:func:`seal_meta`), so an edit of the metadata file itself is detected too.
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
        atomic_write_json(directory / meta_name, seal_meta(meta) if seal else meta)
    except OSError as exc:
        raise _write_failed(directory, exc) from exc


SEAL_KEY = "meta_sha256"


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus ``meta_sha256``: the sha256 of its own canonical JSON (sorted keys, no
    spaces) without that key, so an edited or torn metadata file is detected like a payload
    file (:func:`check_seal`)."""
    return {**meta, SEAL_KEY: _meta_digest(meta)}


def check_seal(path: Path, meta: dict[str, Any], what: str, required: bool = True) -> None:
    """Refuse (exit 2) metadata whose ``meta_sha256`` is missing (if ``required``) or does not
    match its content."""
    if SEAL_KEY not in meta:
        if required:
            raise UserInputError(
                f"{path}: no {SEAL_KEY} (the {what}'s metadata is not sealed: edited or not "
                "written by this modalign); write it again"
            )
        return
    if meta[SEAL_KEY] != _meta_digest(meta):
        raise UserInputError(
            f"{path}: content does not match its {SEAL_KEY} (edited or torn metadata of this "
            f"{what}); write it again"
        )


def verify_files(directory: Path, meta: dict[str, Any], what: str) -> None:
    """Check every payload file listed in ``meta["files"]`` exists with its recorded sha256
    (and the metadata's own seal where it has one, see :func:`seal_meta`)."""
    check_seal(Path(directory), meta, what, required=False)
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
    removed: list[Path] = []
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


def _lock_holder(fd: int) -> str:
    """The pid recorded in a lock file (first word; the kind follows it), or "unknown"."""
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    return words[0] if words else "unknown"


def _lock_kind(directory: Path) -> str | None:
    """The artifact kind recorded in ``directory``'s lock file by the last writer, if any."""
    try:
        words = (Path(directory) / LOCK_FILE).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    return words[1] if len(words) > 1 else None


@contextmanager
def lock_dir(
    directory: Path,
    what: str = "output directory",
    kind: str | None = None,
    check: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``directory`` (created if needed) for a whole run.

    A second writer fails at once (exit 2) naming the directory and the holder's pid, instead of
    interleaving its files with the first one's. The lock dies with its process (``flock``), so
    a killed run never leaves a stale lock behind. Re-entrant within one process. ``kind`` (an
    artifact format name, see :class:`OutputKind`) is recorded beside the pid; ``check`` runs once
    the lock is held, before that record is written (it still sees the previous writer's kind).

    The lock belongs to this process alone: a child made by ``fork`` without ``exec`` (a
    DataLoader worker) inherits the file descriptor, and an ``flock`` lives as long as any copy
    of it is open, so an orphaned worker would keep a killed run's lock. Every forked child
    therefore closes its copies at once (``os.register_at_fork``; closing a copy never unlocks
    the parent's lock). ``exec``-ed children never get one (the descriptor is ``O_CLOEXEC``).
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
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    _LOCK_FDS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLocked(
                f"{directory}: another modalign process (pid {_lock_holder(fd)}) is writing this "
                f"{what}; wait for it to finish or choose another output directory"
            ) from None
        if check is not None:
            try:
                check()
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {kind or ''}".strip().encode(), 0)
        _HELD[key] = 1
        try:
            yield directory
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _LOCK_FDS.discard(fd)
        os.close(fd)


_HELD: dict[str, int] = {}
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    """After ``fork``, in the child: drop the inherited lock descriptors (see :func:`lock_dir`)."""
    for fd in list(_LOCK_FDS):
        with suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its output folder, so the folder can be checked before use.

    ``format`` names the kind (recorded in the folder's lock file by every claim, and the
    ``format`` field of its metadata); ``what`` is how messages name it; ``markers`` are
    ``(glob, format)`` pairs: a JSON file matching ``glob`` whose ``format`` field equals
    ``format`` marks a folder of this kind written before lock files recorded kinds (``None``:
    a file that is not JSON, e.g. a SQLite database, whose presence marks it; a matching lock
    file marks it by the kind it records: other ranks' slots inside the folder).
    ``scratch``: names that writers of this kind may create before the folder is claimed (other
    ranks' lock slots); they do not make a folder non-empty.
    """

    format: str
    what: str
    markers: tuple[tuple[str, str | None], ...] = ()
    scratch: tuple[str, ...] = ()

    def holds(self, directory: Path) -> bool:
        """Whether ``directory`` holds this kind of artifact (finished or interrupted)."""
        directory = Path(directory)
        if _lock_kind(directory) == self.format:
            return True
        for pattern, fmt in self.markers:
            for f in sorted(directory.glob(pattern)):
                if fmt is None:
                    found = f.is_file()
                elif f.name == LOCK_FILE:  # another process's lock slot inside the folder
                    found = _lock_kind(f.parent) == fmt
                else:
                    found = _json_format(f) == fmt
                if found:
                    return True
        return False


def _json_format(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def output_path(path: str | Path | None, key: str) -> Path:
    """``path`` as a folder to write into; an empty value is refused naming ``key`` (an empty
    string would otherwise mean the current folder, silently)."""
    if path is None or not str(path).strip():
        raise ConfigError(
            f"{key}={'' if path is None else str(path)!r}: empty; set it to the folder to write "
            "into (use '.' only if the current folder is meant, and it is empty)"
        )
    return Path(path)


def check_output_dir(path: Path, kind: OutputKind, key: str) -> None:
    """Refuse (exit 2, naming the folder and ``key``) a target that is neither absent, nor
    empty, nor already a ``kind``; nothing is created or changed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(
            f"{key}={path}: exists and is not a folder; choose a new or empty folder for the "
            f"{kind.what}"
        )
    if not path.is_dir():
        return
    entries = [p.name for p in path.iterdir() if p.name not in (LOCK_FILE, *kind.scratch)]
    if entries and not kind.holds(path):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise UserInputError(
            f"{key}={path}: the folder holds files that are not a modalign {kind.what} "
            f"({shown}); refusing to overwrite it: choose a new or empty folder (or move those "
            "files away)"
        )


@contextmanager
def output_dir(path: str | Path | None, kind: OutputKind, key: str) -> Iterator[Path]:
    """Claim an output folder for a whole command: the one mechanism every writer uses.

    Checks the target (:func:`check_output_dir`) before creating anything, takes the folder's
    lock (:func:`lock_dir`, recording ``kind``), checks again under the lock, and yields the
    folder; the lock is held until the block ends, i.e. past the writer's final rename
    (:func:`atomic_dir` carries the lock file into the directory it swaps in). A second writer
    of the same folder gets :class:`DirectoryLocked` (exit 2). Re-entrant within one process.
    """
    target = output_path(path, key)
    check_output_dir(target, kind, key)
    created = not target.exists()
    with lock_dir(
        target, kind.what, kind.format, check=lambda: check_output_dir(target, kind, key)
    ) as held:
        try:
            yield held
        except BaseException:
            if created:  # a command that failed leaves no empty folder behind
                _remove_if_bare(target)
            raise


def _remove_if_bare(directory: Path) -> None:
    """Remove ``directory`` if it holds nothing but its lock file and writers' temp files."""
    with suppress(OSError):
        names = [p.name for p in directory.iterdir()]
        if all(n == LOCK_FILE or n.startswith((*TEMP_PREFIXES, ".stage-")) for n in names):
            shutil.rmtree(directory, ignore_errors=True)
