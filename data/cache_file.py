"""One disk-cache entry as bytes: a safetensors file whose metadata names the format, the entry
and a blake2b checksum of the arrays (dtype, shape and bytes), so a truncated, torn or edited
file reads as "no entry" (and is then rewritten) instead of as a wrong value. No pickles."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from modalign.data.cache import CACHE_FORMAT, CACHE_VERSION, Raw

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
    arrays = {_SINGLE: raw} if single else dict(raw)
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
