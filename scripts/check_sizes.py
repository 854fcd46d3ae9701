"""Print the largest library modules (lines) and functions (lines); exit 1 past the limits.

Limits (issue 9): no module over 400 lines, no function over 60 lines outside tests/scripts.
    python scripts/check_sizes.py [--top 5]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("core", "data", "pretrain", "retrieval", "finetune", "modalign")
MAX_MODULE, MAX_FUNCTION = 400, 60


def measure() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    modules, functions = [], []
    for d in LIBRARY:
        for f in sorted((ROOT / d).rglob("*.py")):
            src = f.read_text(encoding="utf-8")
            rel = f.relative_to(ROOT)
            modules.append((src.count("\n"), str(rel)))
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    functions.append((n, f"{rel}:{node.lineno} {node.name}()"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    modules, functions = measure()
    print(f"largest modules (limit {MAX_MODULE} lines):")
    for n, name in modules[: args.top]:
        print(f"  {n:5d}  {name}")
    print(f"largest functions (limit {MAX_FUNCTION} lines):")
    for n, name in functions[: args.top]:
        print(f"  {n:5d}  {name}")
    over = [m for m in modules if m[0] > MAX_MODULE] + [f for f in functions if f[0] > MAX_FUNCTION]
    for n, name in over:
        print(f"OVER LIMIT: {name} ({n} lines)", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
