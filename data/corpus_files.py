"""Writing a corpus folder (media files + manifests) safely, for the built-in corpus builders.

Protocol: the folder is locked (:func:`modalign.core.artifact.lock_dir`) for the whole build;
existing manifests are removed *first*, so no manifest ever names a media file that is being
rewritten; media files are written in place (thousands of small files: a per-file fsync would
triple the build time); then one ``os.sync`` makes them durable and the manifests are written
last through :func:`modalign.core.artifact.atomic_write_text`. A manifest therefore only
exists when every file it names is complete, whether the build crashed or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_write_text, lock_dir, remove_stale_temp


@contextmanager
def corpus_folder(root: Path, manifests: Sequence[str], what: str) -> Iterator[Path]:
    """Lock ``root`` and remove the old ``manifests`` (file names) before the build writes."""
    with lock_dir(root, what):
        remove_stale_temp(root)
        for name in manifests:
            (root / name).unlink(missing_ok=True)
        yield root


def commit_manifests(root: Path, manifests: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Make the media durable, then write each ``name -> rows`` manifest atomically (JSONL)."""
    os.sync()
    for name, rows in manifests.items():
        atomic_write_text(root / name, "".join(json.dumps(dict(r)) + "\n" for r in rows))
