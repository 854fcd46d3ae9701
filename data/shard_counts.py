"""Sample counts of shards without reading them: ``data pack``'s index, img2dataset's stats.

A resume (and every epoch's per-worker plan) needs each shard's record count. Reading every
tar to count it costs a pass over the corpus; the writers already recorded the counts:

* ``modalign data pack`` writes ``DIR/index.json`` (``format: modalign.shards``) with
  ``pattern`` and per-shard ``counts`` in the pattern's order;
* img2dataset writes ``DIR/NNNNN_stats.json`` beside ``DIR/NNNNN.tar`` with ``successes``.

A count is trusted only for a local shard that is not newer than the file that recorded it
(a shard rewritten since is counted by reading it, as before).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["recorded_counts"]

PACK_INDEX = "index.json"
PACK_FORMAT = "modalign.shards"


def recorded_counts(urls: Sequence[str]) -> dict[str, int]:
    """``{url: records}`` for every local shard in ``urls`` whose count a writer recorded."""
    local = {u: Path(u[5:] if u.startswith("file:") else u) for u in urls if "://" not in u}
    packed: dict[str, tuple[int, Path]] = {}
    for folder in {p.parent for p in local.values()}:
        packed.update(_pack_counts(folder))
    out: dict[str, int] = {}
    for url, path in local.items():
        found = packed.get(str(path)) or _img2dataset_count(path)
        if found is not None and path.is_file():
            n, recorder = found
            if path.stat().st_mtime_ns <= recorder.stat().st_mtime_ns:
                out[url] = n
    return out


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pack_counts(folder: Path) -> dict[str, tuple[int, Path]]:
    """``{shard path: (count, index.json)}`` from a ``data pack`` index in ``folder``."""
    from modalign.data.shards import expand_shards

    index = folder / PACK_INDEX
    meta = _read(index)
    if not meta or meta.get("format") != PACK_FORMAT or not isinstance(meta.get("counts"), list):
        return {}
    try:
        names = expand_shards(str(meta["pattern"]))
    except Exception:
        return {}
    if len(names) != len(meta["counts"]):
        return {}
    return {str(folder / Path(nm).name): (int(n), index) for nm, n in zip(names, meta["counts"])}


def _img2dataset_count(path: Path) -> tuple[int, Path] | None:
    stats_file = path.with_name(path.name.split(".")[0] + "_stats.json")
    stats = _read(stats_file)
    if not stats or not isinstance(stats.get("successes"), int):
        return None
    return int(stats["successes"]), stats_file
