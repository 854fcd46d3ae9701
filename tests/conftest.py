"""Shared fixtures (helpers they use live in the tests/helpers package)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.corpus import write_tiny_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def specs():
    """Small image/audio/text modality specs (data-layer tests)."""
    from helpers.data import small_specs

    return small_specs()


@pytest.fixture(scope="module")
def text_specs(specs):
    return {"text": specs["text"]}


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
