"""The decoded-item cache: each item is decoded once, not once per epoch.

A spec that splits its load (``ModalitySpec.prepare`` + ``augment``; the built-in ``image`` and
``audio`` do) has ``prepare(source)`` kept here, and every epoch only runs ``augment`` on it
with the item's own generator, so a run with the cache gives bit for bit what it gives
without (and resume / N-process equivalence hold either way). Kinds are entries of
:data:`ITEM_CACHES` (entry-point group ``modalign.item_caches``), chosen by ``data.cache``:

* ``none`` (default): every epoch decodes every item.
* ``memory`` (``max_bytes``): a dict in *each process*; DataLoader workers each hold their
  own. Kept for a whole run by :class:`~modalign.data.stream.BatchStream` (one loader, workers
  never restart); shard streams restart workers each epoch, so use ``disk`` for them.
* ``disk`` (``dir``, ``max_bytes``): one safetensors file per item, shared by workers,
  processes and runs, written atomically (:mod:`modalign.core.artifact`) with a checksum; an
  unreadable entry (truncated, torn, edited) is counted, decoded again and rewritten.

An entry's key is the item's identity (a file's absolute path, size and mtime; the blake2b of
the bytes from a shard or a Parquet cell) plus the spec's ``prepare_fingerprint`` (the
decode settings; default: its options) and this format's version, so a changed file or setting
misses. Items that fail to decode (BadItem) are never stored. What building a sample cost
travels with it (``Sample.counts``/``Batch.counts``: decodes, hits, recovered entries), so the
figures are right with any number of workers. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np

from modalign.core.artifact import ArtifactWriteError, atomic_write_bytes, atomic_write_json
from modalign.core.config_io import AT_LEAST_1, Range, to_dict
from modalign.core.errors import UserInputError
from modalign.core.registry import NoOptions
from modalign.data.batch import DecodeCounts
from modalign.data.config import ITEM_CACHES
from modalign.data.modality import ModalitySpec

log = logging.getLogger(__name__)

CACHE_FORMAT = "modalign.item_cache"
CACHE_VERSION = 1
Raw = np.ndarray | dict[str, np.ndarray]


@dataclass(frozen=True)
class CacheEntry:
    """Where one item's prepared value lives: ``name`` (``GROUP/ab/KEY``) inside ``group``, the
    folder of one modality's decode settings (``about`` says which, for people)."""

    name: str
    group: str
    about: Mapping[str, str]


class ItemCache(Protocol):
    """A store of prepared values; outcomes are counted into the sample's ``counts``."""

    def fetch(self, entry: CacheEntry, counts: DecodeCounts) -> Raw | None: ...

    def store(self, entry: CacheEntry, raw: Raw, counts: DecodeCounts) -> None: ...


class CacheFactory(Protocol):
    def __call__(self, options: Any) -> ItemCache | None: ...


# -- keys ------------------------------------------------------------------------------------
def item_identity(value: Any) -> str | None:
    """A file's absolute path + size + mtime (ns), or the blake2b of bytes; None when the value
    is neither or the file cannot be stat'ed (then it is decoded uncached and fails as usual)."""
    if isinstance(value, bytes):
        return "b:" + hashlib.blake2b(value, digest_size=16).hexdigest()
    if isinstance(value, str | os.PathLike):
        try:
            st = os.stat(value)
        except (OSError, ValueError):
            return None
        return f"f:{os.path.abspath(value)}:{st.st_size}:{st.st_mtime_ns}"
    return None


_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def spec_fingerprint(spec: ModalitySpec) -> str:
    """The decode settings ``prepare`` depends on: ``prepare_fingerprint``, else the options."""
    if spec.prepare_fingerprint:
        return spec.prepare_fingerprint
    held = _FINGERPRINTS.get(id(spec))
    if held is not None and held[0]() is spec:
        return held[1]
    opts = spec.options
    text = json.dumps(to_dict(opts) if is_dataclass(opts) else repr(opts), sort_keys=True)
    if len(_FINGERPRINTS) > 256:  # forget specs that are gone
        for key in [k for k, (ref, _) in _FINGERPRINTS.items() if ref() is None]:
            del _FINGERPRINTS[key]
    _FINGERPRINTS[id(spec)] = (weakref.ref(spec), f"{type(opts).__qualname__} {text}")
    return _FINGERPRINTS[id(spec)][1]


def cache_entry(spec: ModalitySpec, value: Any) -> CacheEntry | None:
    """The entry of ``value`` under ``spec``; None when the spec does not split its load, is
    inline, or the value has no identity."""
    if spec.prepare is None or spec.augment is None or spec.inline:
        return None
    ident = item_identity(value)
    if ident is None:
        return None
    fp = spec_fingerprint(spec)
    group = f"{spec.name}-{_digest(f'{CACHE_VERSION}|{spec.name}|{fp}')[:12]}"
    key = _digest(f"{group}|{ident}")
    about = {"modality": spec.name, "settings": fp}
    return CacheEntry(f"{group}/{key[:2]}/{key}", group, about)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# -- the one load path -------------------------------------------------------------------------
def load_value(
    spec: ModalitySpec,
    value: Any,
    train: bool,
    rng: np.random.Generator,
    cache: ItemCache | None,
    counts: DecodeCounts,
) -> Any:
    """``spec.load(value, train, rng)``, through ``cache`` when the spec splits its load.

    Equal either way: a hit runs ``augment`` on the kept value with the same ``rng``. A BadItem
    from ``prepare`` propagates and nothing is stored.
    """
    entry = None if cache is None else cache_entry(spec, value)
    if entry is None or cache is None:
        counts.decoded += 0 if spec.inline else 1
        return spec.load(value, train, rng)
    raw = cache.fetch(entry, counts)
    if raw is None:
        counts.decoded += 1
        raw = frozen(spec.name, spec.prepare(value))  # type: ignore[misc]
        cache.store(entry, raw, counts)
    else:
        counts.cache_hits += 1
    return spec.augment(raw, train, rng)  # type: ignore[misc]


def frozen(name: str, raw: Any) -> Raw:
    """``raw`` checked (a numpy array or a dict of them, no objects) and made read-only, so an
    augment that writes into the kept value fails instead of corrupting later epochs."""
    arrays = raw.values() if isinstance(raw, dict) else [raw]
    for arr in arrays:
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise TypeError(
                f"modality {name!r}: prepare returned {type(arr).__name__}; the decoded-item "
                "cache keeps numpy arrays (or a dict of them) of numbers or booleans"
            )
        arr.flags.writeable = False
    return raw


def nbytes(raw: Raw) -> int:
    return sum(a.nbytes for a in raw.values()) if isinstance(raw, dict) else raw.nbytes


# -- memory ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryOptions:
    """``data.cache: {kind: memory, options: {max_bytes}}`` (per process: each worker its own)."""

    max_bytes: Annotated[int, AT_LEAST_1] = 2**30

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")


class MemoryCache:
    """Prepared values in a dict of this process; once ``max_bytes`` is reached, new values are
    not kept (counted ``cache_full``): a sweep over the corpus would evict every entry before
    its next use, so nothing is evicted."""

    def __init__(self, max_bytes: int = 2**30) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: dict[str, Raw] = {}

    def fetch(self, entry: CacheEntry, counts: DecodeCounts) -> Raw | None:
        return self._items.get(entry.name)

    def store(self, entry: CacheEntry, raw: Raw, counts: DecodeCounts) -> None:
        size = nbytes(raw)
        if self.used + size > self.max_bytes:
            counts.cache_full += 1
            return
        self._items[entry.name] = raw
        self.used += size


# -- disk ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskOptions:
    """``data.cache: {kind: disk, options: {dir, max_bytes}}``; ``dir`` "" = the user cache
    folder (``$XDG_CACHE_HOME/modalign/items``, else ``~/.cache/modalign/items``); ``max_bytes``
    0 = no limit (counted once per process at its first write, plus what it writes)."""

    dir: str = ""
    max_bytes: Annotated[int, Range(ge=0, note="0 = no limit")] = 0

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be 0 (no limit) or positive")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modalign" / "items"


class DiskCache:
    """One ``.safetensors`` file per item under ``root/GROUP/ab/KEY``; see the module doc."""

    def __init__(self, root: str | Path, max_bytes: int = 0) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self._used: int | None = None
        self._described: set[str] = set()
        self._warned = False

    def path(self, entry: CacheEntry) -> Path:
        return self.root / f"{entry.name}.safetensors"

    def fetch(self, entry: CacheEntry, counts: DecodeCounts) -> Raw | None:
        try:
            data = self.path(entry).read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            counts.cache_corrupt += 1
            return None
        raw = read_entry(data, entry.name)
        if raw is None:
            counts.cache_corrupt += 1
            return None
        return frozen(entry.about["modality"], raw)

    def store(self, entry: CacheEntry, raw: Raw, counts: DecodeCounts) -> None:
        data = entry_bytes(raw, entry.name)
        if self.max_bytes and self._usage() + len(data) > self.max_bytes:
            counts.cache_full += 1
            return
        try:
            self._describe(entry)
            atomic_write_bytes(self.path(entry), data, durable=False)  # checksummed
        except ArtifactWriteError as exc:
            counts.cache_write_errors += 1
            if not self._warned:  # the run goes on uncached for this item
                self._warned = True
                log.warning("decoded-item cache: %s (further write errors are only counted)", exc)
            return
        if self._used is not None:
            self._used += len(data)

    def _usage(self) -> int:
        if self._used is None:
            self._used = sum(p.stat().st_size for p in self.root.rglob("*.safetensors"))
        return self._used

    def _describe(self, entry: CacheEntry) -> None:
        """``GROUP/settings.json``: which modality and decode settings a folder holds."""
        if entry.group in self._described:
            return
        path = self.root / entry.group / "settings.json"
        if not path.is_file():
            about = {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, **entry.about}
            atomic_write_json(path, about)
        self._described.add(entry.group)


# -- kinds ---------------------------------------------------------------------------------------
@ITEM_CACHES.register("none")
def no_cache(options: NoOptions) -> None:
    """No cache: every epoch decodes every item (the default)."""
    return None


@ITEM_CACHES.register("memory", options=MemoryOptions)
def memory_cache(options: MemoryOptions) -> MemoryCache:
    """Prepared values in memory, per process (each DataLoader worker holds its own)."""
    return MemoryCache(options.max_bytes)


@ITEM_CACHES.register("disk", options=DiskOptions)
def disk_cache(options: DiskOptions) -> DiskCache:
    """One safetensors file per item in ``dir``, shared by workers, processes and runs."""
    root = Path(options.dir).expanduser() if options.dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(
            f"data.cache.options.dir: {root}: cannot create the cache folder ({exc.strerror}); "
            "point it at a writable folder or set data.cache.kind=none"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserInputError(
            f"data.cache.options.dir: {root}: folder is not writable; point it at a writable "
            "folder or set data.cache.kind=none"
        )
    return DiskCache(root, options.max_bytes)


def open_cache(spec: Any) -> ItemCache | None:
    """The cache ``data.cache`` names (a :class:`~modalign.data.config.CacheSpec`), or None."""
    if spec is None:
        return None
    entry = ITEM_CACHES.get(spec.kind, "data.cache.kind")
    return entry.factory(ITEM_CACHES.options(spec.kind, spec.options, "data.cache.options"))


# -- one disk entry as bytes -------------------------------------------------------------------
# One disk-cache entry as bytes: a safetensors file whose metadata names the format, the entry
# and a blake2b checksum of the arrays (dtype, shape and bytes), so a truncated, torn or edited
# file reads as "no entry" (and is then rewritten) instead of as a wrong value. No pickles.

_SINGLE = "value"  # the array name when prepare returns one array


def _contiguous(arr: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array (a sample rate) into shape (1,)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        arr = _contiguous(arrays[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def entry_bytes(raw: Raw, entry: str) -> bytes:
    """The file content for ``raw`` stored as ``entry``."""
    from safetensors.numpy import save

    single = not isinstance(raw, dict)
    arrays: dict[str, np.ndarray] = dict(raw) if isinstance(raw, dict) else {_SINGLE: raw}
    arrays = {k: _contiguous(v) for k, v in arrays.items()}
    meta = {
        "format": CACHE_FORMAT,
        "format_version": str(CACHE_VERSION),
        "entry": entry,
        "single": "1" if single else "0",
        "blake2b": _checksum(arrays),
    }
    return save(arrays, metadata=meta)


def read_entry(data: bytes, entry: str) -> Raw | None:
    """The value stored in ``data`` for ``entry``, or None when the file is not a whole, valid
    entry of this format and version (any damage: the caller decodes again and rewrites)."""
    from safetensors.numpy import load

    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        if (
            meta.get("format") != CACHE_FORMAT
            or meta.get("format_version") != str(CACHE_VERSION)
            or meta.get("entry") != entry
        ):
            return None
        arrays = load(data)
    except Exception:  # truncated header, bad JSON, short payload: safetensors raises many types
        return None
    if _checksum(arrays) != meta.get("blake2b"):
        return None
    if meta.get("single") == "1":
        return arrays.get(_SINGLE)
    return arrays
