"""Fail when a function of the package is longer than ``MAX_LINES`` lines of code (its docstring not counted).

    python tools/function_length.py ptq_keras      # what `make lint` runs
"""

from __future__ import annotations

import ast
import pathlib
import sys

MAX_LINES = 60


def long_functions(roots, max_lines: int = MAX_LINES) -> list[str]:
    """``"path:line name (N lines)"`` for every function or method over ``max_lines`` lines of code."""
    found = []
    for root in roots:
        for path in sorted(pathlib.Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node, clean=False) is not None:
                    lines -= node.body[0].end_lineno - node.body[0].lineno + 1
                if lines > max_lines:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def main(argv) -> int:
    found = long_functions(argv or ["ptq_keras"])
    for line in found:
        print(f"{line}: over {MAX_LINES} lines of code; split it into functions that each do one thing")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
