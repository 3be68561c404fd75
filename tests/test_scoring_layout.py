"""The kiqa.scoring package's layout: imports go one way, and the row's columns are defined once."""

import ast
from pathlib import Path

import kiqa

KIQA = Path(kiqa.__file__).parent
SCORING = KIQA / "scoring"
# Which kiqa.scoring modules each may import (at any depth of the file): no cycles, and
# the CSV job never reaches into the Scorer nor the loop into either of them.
ALLOWED = {
    "files": set(),
    "batches": {"files"},
    "scorer": {"batches", "files"},
    "table": {"batches", "files"},
    "compare": {"batches", "files", "table"},
}


def _scoring_imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("kiqa.scoring."):
                found.add(node.module.split(".")[2])
            elif node.module == "kiqa.scoring":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("kiqa.scoring."))
    return found


def test_scoring_modules_import_one_way():
    modules = {path.stem for path in SCORING.glob("*.py")} - {"__init__"}
    assert modules == set(ALLOWED)
    wrong = {name: _scoring_imports(SCORING / f"{name}.py") - ALLOWED[name] for name in ALLOWED}
    assert {name: extra for name, extra in wrong.items() if extra} == {}


def test_row_columns_are_assigned_only_in_the_contract():
    names = {"CSV_COLUMNS", "DISTRIBUTION_CSV_COLUMNS"}
    assigned = [
        f"{path.relative_to(KIQA.parent)}:{node.lineno}"
        for path in sorted(KIQA.rglob("*.py")) if path.name != "contract.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets)
    ]
    assert assigned == []


def test_old_module_paths_are_gone_and_the_public_names_still_work():
    assert not any((KIQA / f"{name}.py").exists() for name in ("score", "scorer", "compare"))
    from kiqa.scoring.scorer import Scorer, load_scorer

    assert kiqa.Scorer is Scorer and kiqa.load_scorer is load_scorer
