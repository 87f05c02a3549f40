"""The code's shape: every function short enough to read at once (tests aside)."""

import ast

from conftest import ROOT

MAX_LINES = 60


def test_no_function_is_longer_than_60_lines():
    long = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= MAX_LINES:
                long.add((path.name, node.name))
    assert not long, sorted(long)
