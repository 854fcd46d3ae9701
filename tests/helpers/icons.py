"""A small fake ``@tabler/icons`` package (folder or tarball) for the icon corpus tests."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24" '
    'fill="none" stroke="currentColor" stroke-width="2"><path d="M{a} 4l{b} 16" /></svg>'
)
# 4 categories: Arrows 6 icons (3 families), Shapes 5, Food 4, Rare 1 (dropped with min 3),
# plus one icon with no category (dropped).
ICONS = {
    "arrow-up": "Arrows",
    "arrow-up-off": "Arrows",
    "arrow-up-2": "Arrows",
    "arrow-down": "Arrows",
    "arrow-down-off": "Arrows",
    "arrow-left": "Arrows",
    "circle": "Shapes",
    "circle-off": "Shapes",
    "square": "Shapes",
    "triangle": "Shapes",
    "hexagon": "Shapes",
    "apple": "Food",
    "bread": "Food",
    "cheese": "Food",
    "egg": "Food",
    "comet": "Rare",
    "blank": "",
}


def cairo_available() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


needs_cairo = pytest.mark.skipif(
    not cairo_available(), reason="CairoSVG/libcairo2 not installed (pip install 'modalign[icons]')"
)


def fake_package(root: Path, icons: dict[str, str] = ICONS) -> Path:
    """``root/package/{package.json, icons.json, icons/outline/*.svg}``; returns ``root/package``."""
    pkg = root / "package"
    (pkg / "icons" / "outline").mkdir(parents=True)
    table = {}
    for i, (name, category) in enumerate(icons.items()):
        table[name] = {
            "name": name,
            "category": category,
            "tags": [f"tag{i}", name.split("-")[0], "shared-tag"],
            "styles": {"outline": {"version": "1.0", "unicode": f"{i:04x}"}},
        }
        svg = SVG.format(a=2 + i % 10, b=1 + i % 7)
        (pkg / "icons" / "outline" / f"{name}.svg").write_text(svg)
    (pkg / "icons.json").write_text(json.dumps(table))
    meta = {"name": "@tabler/icons", "version": "9.9.9", "license": "MIT"}
    (pkg / "package.json").write_text(json.dumps(meta))
    return pkg


def tarball(pkg: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    return out
