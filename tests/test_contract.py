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

