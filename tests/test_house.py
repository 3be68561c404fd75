"""House rules that a reader relies on: short functions, or a reason beside a long one."""

import ast
from pathlib import Path

KIQA = Path(__file__).resolve().parents[1] / "kiqa"
LIMIT = 60  # lines of code, docstring excluded
REASON = "# Over 60 lines:"


def _code_lines(node):
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return node.end_lineno - body[0].lineno + 1


def test_no_function_over_60_lines_without_a_reason_beside_it():
    unexplained = []
    for path in sorted(KIQA.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _code_lines(node) <= LIMIT:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = "\n".join(lines[max(0, first - 4):first - 1])
            if REASON not in above:
                unexplained.append(f"{path.relative_to(KIQA.parent)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert unexplained == []


def test_the_rule_sees_a_long_function():
    source = "def f():\n    '''doc'''\n" + "    x = 1\n" * (LIMIT + 1)
    assert _code_lines(ast.parse(source).body[0]) == LIMIT + 1
