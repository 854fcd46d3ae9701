"""Structure check of the library: cohesion rules that fail CI, size hints that only print.

Fails (exit 1) on:
  * an import of another module's ``_private`` name (``from modalign.x.y import _name`` or
    ``modalign.x.y._name`` through an imported module), lazy imports inside functions included;
  * an import cycle between library modules (every import counts: top-level, lazy, and
    ``TYPE_CHECKING``-only imports alike, since a cycle hidden behind a lazy import is still a
    cycle in the design);
  * a compatibility shim: a module-level ``__getattr__`` (PEP 562 forwarding of moved names).
Prints as hints (never fails): modules over 800 lines and functions over 100 lines.

    python scripts/check_structure.py            # the report; exit 1 on a violation
    python scripts/check_structure.py --counts   # one line of counts (for notes and docs)

A package ``__init__`` that re-exports its own sub-modules' public names is the layer's public
surface, not a cycle: imports of a package by its own sub-modules are not counted (a sub-module
importing its parent package's ``__init__`` would be, since that runs the whole package).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# modalign.<layer> lives in a top-level folder (setup.cfg's package_dir); the app in modalign/.
LAYER_DIRS = {
    "modalign.core": ROOT / "core",
    "modalign.data": ROOT / "data",
    "modalign.pretrain": ROOT / "pretrain",
    "modalign.retrieval": ROOT / "retrieval",
    "modalign.finetune": ROOT / "finetune",
}
APP_DIR = ROOT / "modalign"
MODULE_HINT, FUNCTION_HINT = 800, 100


@dataclass
class Module:
    """One library module: its dotted name, file, and what it imports."""

    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # dotted modules it imports
    private: list[str] = field(default_factory=list)  # "line N: name from module"


def discover() -> dict[str, Module]:
    """Every library module by dotted name (``modalign.data.batch``, ``modalign.pretrain``...)."""
    roots = [("modalign", APP_DIR), *LAYER_DIRS.items()]
    found: dict[str, Module] = {}
    for prefix, folder in roots:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(p.startswith(".") for p in rel):
                continue
            is_package = rel[-1] == "__init__"
            parts = rel[:-1] if is_package else rel
            name = ".".join((prefix, *parts))
            # the app folder also holds modalign/configs etc.: only .py files count
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found[name] = Module(name, path, is_package, tree)
    return found


def _resolve(mod: Module, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def analyse(modules: dict[str, Module]) -> None:
    """Fill each module's imports (known library modules only) and its private-name imports."""
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known_prefix(alias.name, modules)
                    if target:
                        mod.imports.add(target)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node)
                if not base or not base.startswith("modalign"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:  # `from pkg import submodule`
                        mod.imports.add(full)
                        continue
                    target = _known_prefix(base, modules)
                    if target:
                        mod.imports.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        mod.private.append(f"line {node.lineno}: {alias.name} from {base}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                dotted = _dotted(node.value)
                if dotted and dotted in modules and not node.attr.startswith("__"):
                    mod.private.append(f"line {node.lineno}: {dotted}.{node.attr}")
        mod.imports.discard(mod.name)
        # a package's own sub-modules importing each other through the package is not a cycle
        # edge to the package itself when the importer lives inside it
        mod.imports = {t for t in mod.imports if not mod.name.startswith(t + ".")}


def _known_prefix(name: str, modules: dict[str, Module]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].imports):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for name in sorted(modules):
        if name not in index:
            visit(name)
    return sorted(out, key=lambda c: (-len(c), c))


def shims(modules: dict[str, Module]) -> list[str]:
    """Modules defining a module-level ``__getattr__`` (name forwarding after a move)."""
    return [
        f"{m.path.relative_to(ROOT)}:{node.lineno}"
        for m in modules.values()
        for node in m.tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__"
    ]


def size_hints(modules: dict[str, Module]) -> list[str]:
    hints = []
    for m in modules.values():
        lines = m.path.read_text(encoding="utf-8").count("\n")
        if lines > MODULE_HINT:
            hints.append(f"{m.path.relative_to(ROOT)}: {lines} lines (hint: > {MODULE_HINT})")
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > FUNCTION_HINT:
                    hints.append(
                        f"{m.path.relative_to(ROOT)}:{node.lineno} {node.name}(): {n} lines "
                        f"(hint: > {FUNCTION_HINT})"
                    )
    return hints


def folder_sizes(modules: dict[str, Module]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in modules.values():
        folder = str(m.path.parent.relative_to(ROOT))
        counts[folder] = counts.get(folder, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", action="store_true", help="print one line of counts")
    args = ap.parse_args(argv)
    modules = discover()
    analyse(modules)
    private = [(m.path.relative_to(ROOT), p) for m in modules.values() for p in m.private]
    found_cycles = cycles(modules)
    found_shims = shims(modules)
    biggest = max(folder_sizes(modules).items(), key=lambda kv: kv[1])
    if args.counts:
        sizes = ", ".join(str(len(c)) for c in found_cycles) or "-"
        print(
            f"modules {len(modules)}; private imports {len(private)}; cycles {len(found_cycles)} "
            f"(sizes {sizes}); shims {len(found_shims)}; largest folder {biggest[0]} "
            f"({biggest[1]} modules)"
        )
        return 0
    for path, what in private:
        print(f"PRIVATE IMPORT: {path} {what}", file=sys.stderr)
    for comp in found_cycles:
        print(f"IMPORT CYCLE ({len(comp)} modules): {' <-> '.join(comp)}", file=sys.stderr)
    for where in found_shims:
        print(f"SHIM (module-level __getattr__): {where}", file=sys.stderr)
    for hint in size_hints(modules):
        print(f"hint: {hint}")
    bad = len(private) + len(found_cycles) + len(found_shims)
    print(
        f"{len(modules)} modules: {len(private)} private imports, {len(found_cycles)} import "
        f"cycles, {len(found_shims)} shims"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
