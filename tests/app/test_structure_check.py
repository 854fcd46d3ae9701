"""scripts/check_structure.py finds what it exists to find: private imports, cycles (lazy ones
too), shims; and the library itself has none of them."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _checker():
    spec = importlib.util.spec_from_file_location(
        "check_structure", ROOT / "scripts" / "check_structure.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_structure"] = module
    spec.loader.exec_module(module)
    return module


def _modules(cs, sources: dict[str, str]):
    found = {}
    for name, src in sources.items():
        is_package = name.endswith(".__init__")
        dotted = name.removesuffix(".__init__")
        path = cs.ROOT / (name.replace(".", "/") + ".py")
        found[dotted] = cs.Module(dotted, path, is_package, ast.parse(src))
    cs.analyse(found)
    return found


def test_a_cycle_through_a_lazy_import_is_found() -> None:
    cs = _checker()
    mods = _modules(cs, {
        "modalign.data.a": "from modalign.data.b import x\n",
        "modalign.data.b": "def f():\n    from modalign.data.a import y\n",
        "modalign.data.c": "from modalign.data.a import x\n",
    })  # fmt: skip
    assert cs.cycles(mods) == [["modalign.data.a", "modalign.data.b"]]


def test_a_private_name_of_another_module_is_found_and_a_shim_too() -> None:
    cs = _checker()
    mods = _modules(cs, {
        "modalign.data.a": "def _hidden(): ...\ndef __getattr__(name): ...\n",
        "modalign.data.b": "from modalign.data.a import _hidden\nimport modalign.data.a\nmodalign.data.a._hidden()\n",
    })  # fmt: skip
    assert len(mods["modalign.data.b"].private) == 2 and not mods["modalign.data.a"].private
    assert [w.split(":")[0] for w in cs.shims(mods)] == ["modalign/data/a.py"]


def test_a_package_importing_its_own_submodules_is_no_cycle() -> None:
    cs = _checker()
    mods = _modules(cs, {
        "modalign.data.__init__": "from modalign.data.a import x\n",
        "modalign.data.a": "from modalign.data import b\n",
        "modalign.data.b": "y = 1\n",
    })  # fmt: skip
    assert cs.cycles(mods) == []


def test_the_library_passes_the_structure_check() -> None:
    cs = _checker()
    mods = cs.discover()
    cs.analyse(mods)
    private = [p for m in mods.values() for p in m.private]
    assert (private, cs.cycles(mods), cs.shims(mods)) == ([], [], [])
    assert max(cs.folder_sizes(mods).values()) <= 20
