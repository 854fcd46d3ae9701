"""Writing a corpus folder (media files + manifests) safely, for the built-in corpus builders.

Protocol: the folder is claimed (:func:`modalign.core.artifact.output_dir`: refused unless new,
empty or a corpus folder; locked) for the whole build;
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

from modalign.core.artifact import OutputKind, atomic_write_text, output_dir, remove_stale_temp

CORPUS_KIND = OutputKind("modalign.corpus-folder", "corpus folder")
"""A folder written by a corpus builder (recorded in its lock file)."""


@contextmanager
def corpus_folder(
    root: Path,
    manifests: Sequence[str],
    what: str,
    key: str = "--out",
    markers: tuple[tuple[str, str], ...] = (),
) -> Iterator[Path]:
    """Claim ``root`` (exit 2 naming ``key`` if it holds other files, or another build runs;
    ``what`` names the corpus, ``markers`` as in :class:`~modalign.core.artifact.OutputKind`)
    and remove the old ``manifests`` before the build writes."""
    with output_dir(root, OutputKind(CORPUS_KIND.format, what, markers), key):
        remove_stale_temp(root)
        for name in manifests:
            (root / name).unlink(missing_ok=True)
        yield root


def commit_manifests(root: Path, manifests: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Make the media durable, then write each ``name -> rows`` manifest atomically (JSONL)."""
    os.sync()
    for name, rows in manifests.items():
        atomic_write_text(root / name, "".join(json.dumps(dict(r)) + "\n" for r in rows))
