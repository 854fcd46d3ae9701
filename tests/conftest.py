"""Shared fixtures (helpers they use live in the tests/helpers package)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist each worker (and every process a test starts from it) gets its share of
# the cores as torch/OpenMP threads, set before torch is imported. Two workers each running
# torch's default two OpenMP threads on two cores spin at every barrier: small tensor ops ran
# about 3x slower and CI went past its budget (issue 22). A value already set is kept.
try:
    _cores = len(os.sched_getaffinity(0))  # the cores this process may use (Linux)
except AttributeError:  # macOS, Windows
    _cores = os.cpu_count() or 1
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = str(max(1, _cores // int(_workers)))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _share)

from helpers.corpus import write_tiny_corpus  # after the thread share above
from helpers.trained import (
    TinyBundle,
    check_unchanged,
    train_tiny_bundle,
    tree_digest,
    write_shared_corpus,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "corpus")


# ---- shared, read-only, built once per session (per xdist worker) -------------------------
# Every test that only needs "a corpus" / "a trained model" uses these instead of writing or
# training its own; a test that changes files copies first (helpers.trained.copy_tree). Each
# fixture checks at the end of the session that no test changed its folder.


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared tiny paired corpus (16 items, 4 classes): its train.jsonl manifest."""
    manifest = write_shared_corpus(tmp_path_factory.mktemp("shared-corpus"))
    digest = tree_digest(manifest.parent)
    yield manifest
    check_unchanged(manifest.parent, digest, "corpus")


def _shared_bundle(
    factory: pytest.TempPathFactory, manifest: Path, name: str, *extra: str
) -> Iterator[TinyBundle]:
    bundle = train_tiny_bundle(manifest, factory.mktemp(name) / "model", *extra)
    digest = tree_digest(bundle.model)
    yield bundle
    check_unchanged(bundle.model, digest, name)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Iterator[TinyBundle]:
    """An image/audio/text bundle trained 2 steps on :func:`corpus` (see helpers.trained)."""
    yield from _shared_bundle(tmp_path_factory, corpus, "shared-bundle")


@pytest.fixture(scope="session")
def tiny_bundle_no_text(
    tmp_path_factory: pytest.TempPathFactory, corpus: Path
) -> Iterator[TinyBundle]:
    """The same without a text tower (image + audio), trained on :func:`corpus`."""
    yield from _shared_bundle(
        tmp_path_factory, corpus, "shared-bundle-no-text", "model.modalities=[image, audio]"
    )


@pytest.fixture(scope="module")
def specs():
    """Small image/audio/text modality specs (data-layer tests)."""
    from helpers.data import small_specs

    return small_specs()


@pytest.fixture(scope="module")
def text_specs(specs):
    return {"text": specs["text"]}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a ``heavy`` test first, then files holding a ``slow`` one, then the rest (a
    stable sort: pytest-randomly's shuffle, which runs before this hook, is kept within each
    group). Under ``--dist loadfile`` xdist hands files out in this order, so the longest files
    start first instead of one of them starting last and leaving one worker running alone at
    the end."""
    heavy = {item.path for item in items if item.get_closest_marker("heavy")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in heavy, item.path not in slow))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Print the random-order seed even under ``-q`` (pytest-randomly only puts it in the
    header), so any order CI ran can be reproduced."""
    if not config.pluginmanager.hasplugin("randomly"):
        return
    seed = config.getoption("randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(
            f"random test order seed {seed}: reproduce with "
            f"python -m pytest -p randomly --randomly-seed={seed}"
        )
