"""docs/design.md stays true: every ```python block under "How to add" runs as written.

Each block runs in a fresh interpreter (registrations never leak into other tests).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def _examples() -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## How to add", 1)[1]
    found = []
    for title, body in re.findall(r"### (.+?)\n(.*?)(?=\n### |\Z)", section, flags=re.S):
        found += [(title, code) for code in re.findall(r"```python\n(.*?)```", body, flags=re.S)]
    return found


def test_the_doc_has_worked_examples() -> None:
    titles = {t for t, _ in _examples()}
    assert {"A modality", "A tower", "A contrastive loss", "A fusion head"} <= titles


@pytest.mark.distributed  # each example in a fresh interpreter
@pytest.mark.parametrize(("title", "code"), _examples(), ids=[t for t, _ in _examples()])
def test_worked_example_runs(title: str, code: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{title}: example failed\n{proc.stderr[-3000:]}"
