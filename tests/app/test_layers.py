"""Layer rules: imports flow one way, core <- data <- pretrain <- retrieval <- finetune <- top.

Every ``import modalign.X`` / ``from modalign.X import`` in a library module, including lazy
imports inside functions, must name a layer at or below the module's own.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"core": 0, "data": 1, "pretrain": 2, "retrieval": 3, "finetune": 4, "modalign": 5}


def _layer_of_import(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] != "modalign":
        return None
    if len(parts) == 1:
        return LAYERS["modalign"]
    return LAYERS.get(parts[1], LAYERS["modalign"])


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return [f for d in LAYERS for f in sorted((ROOT / d).rglob("*.py"))]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_import(path: Path) -> None:
    own = LAYERS[path.relative_to(ROOT).parts[0]]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    upward = [
        f"line {line}: {name}"
        for line, name in _imports(tree)
        if (layer := _layer_of_import(name)) is not None and layer > own
    ]
    assert not upward, f"{path.relative_to(ROOT)} imports a higher layer: {upward}"


def test_core_imports_nothing_else_of_modalign() -> None:
    for f in sorted((ROOT / "core").rglob("*.py")):
        names = [n for _, n in _imports(ast.parse(f.read_text(encoding="utf-8")))]
        bad = [n for n in names if n.startswith("modalign.") and not n.startswith("modalign.core")]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_app_folder_links_each_layer_for_static_tools() -> None:
    """``modalign/<layer> -> ../<layer>``: mypy and IDEs resolve ``modalign.data`` to files.

    setup.cfg's package_dir installs the layer folders; static tools cannot read it. The
    links are relative (a clone anywhere works) and point at the layer folders themselves.
    """
    for layer in [d for d in LAYERS if d != "modalign"]:
        link = ROOT / "modalign" / layer
        assert link.is_symlink(), f"{link} is missing: ln -s ../{layer} modalign/{layer}"
        assert os.readlink(link) == f"../{layer}" and link.resolve() == (ROOT / layer).resolve()
