"""Tests for kiqa.contract: the shared facts, and the CLI help paths that use them, load without TF."""

import subprocess
import sys


def test_contract_and_the_cli_help_paths_do_not_load_tensorflow():
    # `kiqa predict --help` and `kiqa fetch-koniq --help` read their defaults from the
    # contract; they must not wait for TensorFlow to import.
    code = (
        "import sys, kiqa.contract, kiqa.cli.predict, kiqa.cli.fetch, kiqa.data.fetch\n"
        "kiqa.cli.predict.build_parser().format_help(), kiqa.cli.fetch.build_parser().format_help()\n"
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



# ------------------------------------------------------------------ one definition per value

import ast
import tokenize
from pathlib import Path

import kiqa
from kiqa import contract

KIQA = Path(kiqa.__file__).parent
SHARED = {name: value for name, value in vars(contract).items() if name.isupper()}
# The file names of the contract: spelled anywhere else, they drift apart.
FILE_NAMES = {value for name, value in SHARED.items() if name.endswith(("_FILE", "_EXTRA"))}
# A 100 that is not the MOS scale says so on its line.
NOT_THE_SCALE = "not the MOS scale"


def _modules():
    return [path for path in sorted(KIQA.rglob("*.py")) if path != Path(contract.__file__)]


def test_contract_file_names_and_the_mos_scale_are_spelled_only_in_the_contract():
    assert {"kiqa.json", "provenance.json", "assets.extra"} <= FILE_NAMES
    found = []
    for path in _modules():
        with open(path, "rb") as source:
            for token in tokenize.tokenize(source.readline):
                where = f"{path.relative_to(KIQA.parent)}:{token.start[0]}"
                if token.type == tokenize.STRING and token.string.strip("rbf\"'") in FILE_NAMES:
                    found.append(f"{where}: {token.string}")
                if (token.type == tokenize.NUMBER and ast.literal_eval(token.string) == contract.MOS_SCALE
                        and NOT_THE_SCALE not in token.line):
                    found.append(f"{where}: {token.line.strip()}")
    assert found == []


def test_contract_values_are_defined_once_and_imported_from_the_contract():
    """No module assigns a contract name (PARITY_BATCH = 8 in two places), and every import
    of one reads kiqa.contract (not a module that re-exports it, perhaps loading TF)."""
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(KIQA.parent)
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.lstrip("_") in SHARED and isinstance(node.value, ast.Constant):
                    found.append(f"{where}:{node.lineno}: defines {target.id}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "kiqa.contract":
                shared = [alias.name for alias in node.names if alias.name in SHARED]
                if shared:
                    found.append(f"{where}:{node.lineno}: imports {shared} from {node.module}")
    assert found == []
