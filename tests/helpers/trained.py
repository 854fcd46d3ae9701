"""The tiny corpus and trained tiny bundles shared by every test that only needs "a trained model".

The session fixtures in ``tests/conftest.py`` build them once per test session (once per xdist
worker) under pytest's base temp folder. They are read-only for the tests: a test that changes
files copies first (:func:`copy_tree`), and the fixtures check at the end of the session that
nothing under them changed (:func:`tree_digest`), so a test that writes into a shared folder fails
loudly instead of leaking state into whichever test runs next.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import NamedTuple

from helpers.corpus import tiny_overrides, write_tiny_corpus

CORPUS_ITEMS = 16  # 4 classes x 4 items: 2 batches of 8
BUNDLE_STEPS = 2
BUNDLE_BATCH = 8


class TinyBundle(NamedTuple):
    """A trained bundle and the manifest it was trained on (unpacks as ``manifest, model``)."""

    corpus: Path  # train.jsonl beside img/ and wav/
    model: Path  # the bundle folder (config.yaml, model.safetensors, modalign.json, checkpoints/)


def write_shared_corpus(root: Path) -> Path:
    """The shared corpus: :func:`write_tiny_corpus` with 16 items, seed 0; returns its manifest."""
    return write_tiny_corpus(root, n=CORPUS_ITEMS)


def train_tiny_bundle(manifest: Path, out: Path, *extra: str) -> TinyBundle:
    """Pretrain the tiny image/audio/text model (library defaults plus
    :func:`tiny_overrides`, 2 steps of batch 8, a checkpoint after each) on ``manifest``;
    ``extra`` overrides are applied last (e.g. ``model.modalities=[image,audio]``)."""
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    sets = [*tiny_overrides(manifest, out, steps=BUNDLE_STEPS, batch=BUNDLE_BATCH), *extra]
    pretrain(load_config(None, sets))
    return TinyBundle(manifest, out)


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a shared folder (corpus or bundle) for a test that changes files."""
    shutil.copytree(src, dst)
    return dst


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes under ``root`` (folders included)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def check_unchanged(root: Path, digest: str, what: str) -> None:
    """Raise if a test changed the shared ``root`` (see the module docstring)."""
    if tree_digest(root) != digest:
        raise AssertionError(
            f"a test changed the shared {what} under {root}: it is read-only for tests; "
            "copy it first with helpers.trained.copy_tree"
        )
