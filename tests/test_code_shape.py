"""The code's shape: every function short enough to read at once (tests aside)."""

import ast

from conftest import ROOT

MAX_LINES = 60
# Still longer, to be split: speculative greedy decoding (into the draft table and the verify loop). Shortening it
# fails this test until it leaves the list.
STILL_LONG = {("speculative.py", "speculative_greedy")}


def test_no_function_is_longer_than_60_lines_but_the_one_still_to_split():
    long = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= MAX_LINES:
                long.add((path.name, node.name))
    assert long == STILL_LONG
