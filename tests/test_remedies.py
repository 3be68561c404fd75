"""kiqa.cli.remedies: library errors state facts; only kiqa/cli names flags, from one table."""

import importlib
import inspect
import re
import string
import tokenize
from pathlib import Path

import pytest

import kiqa
from kiqa import cli, errors
from kiqa.cli import _common, remedies
from kiqa.cli.remedies import REMEDIES, remedy_for

KIQA = Path(kiqa.__file__).parent
# A command-line flag: two dashes and a letter, not inside a word ("a--b") or a rule ("---").
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# "kiqa score", "kiqa-train", "kiqa fetch-koniq" at the start of a backquoted command.
COMMAND = re.compile(r"^kiqa[ -]([a-z-]+)")
MODULES = {name: module.rsplit(".", 1)[-1] for name, (module, _) in cli.COMMANDS.items()}


def _string_literals(path):
    with open(path, "rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.STRING:
                yield token.start[0], token.string


def test_no_library_string_names_a_flag():
    """Messages and docstrings outside kiqa/cli name arguments and settings, never flags
    (comments may: they are for the people changing the code)."""
    found = [
        f"{path.relative_to(KIQA.parent)}:{line}: {FLAG.search(text).group()}"
        for path in sorted(KIQA.rglob("*.py")) if "cli" not in path.relative_to(KIQA).parts[:1]
        for line, text in _string_literals(path) if FLAG.search(text)
    ]
    assert found == []


def _flags(module):
    parser = importlib.import_module(f"kiqa.cli.{module}").build_parser()
    return {option for action in parser._actions for option in action.option_strings}


def _checked_flags(text, own_command):
    """(command module, flag) for every flag in a remedy: a backquoted `kiqa X ...` names
    X's flags, anything else the command's own."""
    for i, part in enumerate(text.split("`")):
        match = COMMAND.match(part) if i % 2 else None
        command = MODULES[match.group(1)] if match else own_command
        for flag in FLAG.findall(part):
            yield command, flag


def _rows():
    for cls, by_command in REMEDIES.items():
        for command, entry in by_command.items():
            for text in remedies.texts(entry):
                yield cls, command, text


@pytest.mark.parametrize("cls, command, text", list(_rows()), ids=lambda v: getattr(v, "__name__", None))
def test_every_remedy_names_flags_its_command_has(cls, command, text):
    assert command in MODULES.values(), f"{command} is not a kiqa.cli command module"
    for where, flag in _checked_flags(text, command):
        assert flag in _flags(where), f"{cls.__name__} remedy for {command} names {flag}, which kiqa.cli.{where} lacks"
    # Its template reads only attributes the error class carries.
    fields = {re.split(r"[.\[]", name)[0] for _, name, _, _ in string.Formatter().parse(text) if name}
    carried = {name for klass in cls.__mro__ if "__init__" in vars(klass)
               for name in inspect.signature(klass.__init__).parameters} - {"self", "message"}
    assert fields <= carried, f"{cls.__name__} has no {fields - carried}"


def test_every_table_flag_check_can_fail():
    # The check above reads flags inside and outside backquotes from the right parser.
    assert list(_checked_flags("pass --port, or `kiqa export RUN --base B`", "serve_dev")) == [
        ("serve_dev", "--port"), ("export", "--base")]
    assert "--unsafe" not in _flags("evaluate")


def test_remedy_follows_the_errors_facts():
    download = errors.WeightsError("no weights", variant="tiny", weights="imagenet", problem="download")
    mismatch = errors.WeightsError("does not fit", variant="tiny", weights="w.h5", problem="mismatch")
    assert "convnext_tiny_notop.h5" in remedy_for(download, "train")
    assert remedy_for(mismatch, "train").startswith("pass --weights with a file of this variant")
    timeout = errors.ServingStatusError("slow", code="DEADLINE_EXCEEDED", server="h:1", model="kiqa",
                                        signature="serving_default", timeout=5.0)
    assert remedy_for(timeout, "predict").startswith("raise --timeout")
    lost = errors.ClusterError("a process was lost", missing=())
    assert remedy_for(lost, "train") is None  # nothing to pass: the message says what to do
    # A command without the flag gives no remedy rather than a wrong one.
    lambda_layer = errors.LambdaLayerError("Lambda layer", path="m.keras")
    assert "--unsafe" in remedy_for(lambda_layer, "score")
    assert remedy_for(lambda_layer, "evaluate") is None


def test_entry_point_prints_the_commands_remedy_under_the_error(capsys):
    # The library's message states the fact; the command adds its own flags
    # (tests/test_devserver.py runs the real `kiqa serve-dev` into one).
    def fails(argv=None, prog=None):
        raise errors.PortError("cannot listen on 127.0.0.1:1 (in use)", address="127.0.0.1:1", reason="in use")

    fails.__module__ = "kiqa.cli.serve_dev"
    assert _common.entry_point(fails)([]) == _common.EXIT_ERROR
    assert capsys.readouterr().err == ("kiqa serve-dev: error: cannot listen on 127.0.0.1:1 (in use)\n"
                                       "kiqa serve-dev: hint: pick another --port\n")
    fails.__module__ = "kiqa.cli.score"  # a command whose parser has no --port
    assert _common.entry_point(fails)([]) == _common.EXIT_ERROR
    assert "hint" not in capsys.readouterr().err
