"""The house's size limits, read from the code (issue #29): no function over 60 lines in any part
of the project, and no file in serving/ over 400 lines, so a module that grows past them is
split when it does, not in a later clean-up."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pixtok", "training", "export", "serving", "tools", "scripts")
MAX_FUNCTION_LINES, MAX_SERVING_FILE_LINES = 60, 400


def sources() -> list[Path]:
    return sorted(p for part in PARTS for p in (ROOT / part).rglob("*.py"))


def test_no_function_is_over_60_lines():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_file_in_serving_is_over_400_lines():
    long = [f"{p.relative_to(ROOT)} ({n})" for p in sorted((ROOT / "serving").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_SERVING_FILE_LINES]
    assert not long, f"files in serving/ over {MAX_SERVING_FILE_LINES} lines: {long}"
    assert len(sources()) > 100          # the walk found the project
