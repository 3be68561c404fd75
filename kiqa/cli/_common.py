"""What every command shares: a quiet console, error reporting and exit codes."""

import functools
import importlib.abc
import importlib.machinery
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from kiqa.errors import KiqaError

EXIT_OK = 0
EXIT_ERROR = 1  # kiqa refused: bad input, bad config (message says what to fix)
EXIT_PARTIAL = 3  # the job finished but some inputs failed (listed in its output)
EXIT_INTERRUPTED = 130

# KIQA_VERBOSE=1 (or `kiqa-train --verbose`) shows TF's own console output untouched.
VERBOSE_ENV = "KIQA_VERBOSE"
# TF's C++ log levels: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR. 3 by default: on a
# machine without a GPU, TF logs "failed call to cuInit" and "oneDNN supports DT_UINT8 only
# on platforms with AVX-512" at ERROR level on every run; real failures reach Python as
# exceptions, which kiqa reports.
DEFAULT_TF_LOG_LEVEL = "3"
# Console scripts with their own name (setup.cfg); every other command is `kiqa <command>`.
SCRIPT_NAMES = {"train": "kiqa-train", "evaluate": "kiqa-evaluate", "export": "kiqa-export"}
_COMMAND_NAMES = {"fetch": "fetch-koniq", "serve_dev": "serve-dev"}
# An absl/TF C++ log line: severity letter, MMDD, time, thread, file:line].
_CPP_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:. ]+\s+\d+ [^\]]+\] ")
_SEVERITIES = "IWEF"
# A Python warning as `warnings` prints it: "path.py:12: UserWarning: ...".
_PYTHON_WARNING = re.compile(r"^\S.*:\d+: \w*(Warning|Error)\b")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def verbose_requested(argv=()):
    """Whether the user asked to see TF's own output (`--verbose` or KIQA_VERBOSE=1)."""
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_tensorflow(verbose=False):
    """Keeps TF's start-up chatter off the console, unless asked for.

    TF_CPP_MIN_LOG_LEVEL only filters what TF logs after it has read it: the lines that
    TF's shared libraries print while they load (the absl preamble, "oneDNN custom
    operations are on", "Could not find cuda drivers") come before, whatever the level.
    So besides setting the level (a user's own value is kept), TF's first import runs with
    the process's stderr captured, and the captured lines are replayed filtered by that
    level: C++ log lines below it are dropped, anything else (a Python traceback, a
    message from another library) is shown. TF_ENABLE_ONEDNN_OPTS is left alone: it
    changes numerics, not just the console.

    Args:
        verbose: change nothing and show everything.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    # TF's Python-side logger ("tensorflow") and absl's carry deprecation and retracing
    # notes meant for library authors; kiqa's own messages use other loggers.
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def _min_severity():
    try:
        return min(max(int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")), 0), 3)
    except ValueError:
        return 0


def filter_tf_output(text, min_severity=None):
    """The lines of captured TF start-up output worth showing at a C++ log level.

    Args:
        text: what was written to stderr while TF loaded.
        min_severity: 0-3 as TF_CPP_MIN_LOG_LEVEL; None reads it from the environment.

    Returns:
        The kept lines, in order (C++ log lines at or above the level, any other line;
        absl's "before InitializeLog" preamble only when a log line is kept).
    """
    level = _min_severity() if min_severity is None else min_severity
    kept, dropping = [], False
    for line in text.splitlines():
        match = _CPP_LOG_LINE.match(line)
        if match:
            dropping = _SEVERITIES.index(match.group(1)) < level
        elif line.strip() == _ABSL_PREAMBLE or not line.strip():
            dropping = False
            continue
        elif _PYTHON_WARNING.match(line):
            dropping = False
        # Else a continuation ("To enable the following instructions: AVX2 ...") belongs
        # to the log line before it.
        if not dropping:
            kept.append(line)
    return kept


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs TF's first import with stderr (file descriptor 2) captured, then replays it filtered."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: later imports are ordinary
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CapturingLoader(spec.loader)
        return spec


class _CapturingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with tempfile.TemporaryFile(mode="w+b") as capture:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(capture.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                for line in filter_tf_output(capture.read().decode("utf-8", "replace")):
                    print(line, file=sys.stderr)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


def program_name(module_name):
    """The name a user types for a command module: `kiqa-train`, `kiqa score`, ...

    Args:
        module_name: e.g. "kiqa.cli.train".
    """
    if module_name == "__main__":  # `python -m kiqa.cli.train`
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module_name = spec.name if spec else "kiqa"
    command = module_name.rsplit(".", 1)[-1]
    return SCRIPT_NAMES.get(command) or f"kiqa {_COMMAND_NAMES.get(command, command.replace('_', '-'))}"


def runnable(command):
    """A printed command's program as this user can run it: `kiqa score` -> `kiqa score`
    when the shell finds this installation's `kiqa`, else the script's own path
    (`.venv/bin/kiqa score`, for a venv that is not activated), else `python -m kiqa.cli score`.

    Args:
        command: what a user types, starting with a console script: "kiqa score",
            "kiqa-train", "kiqa-evaluate".

    Returns:
        The command with its program replaced by what runs this installation.
    """
    program, _, rest = command.partition(" ")
    script = Path(sys.executable).parent / program
    found = shutil.which(program)
    if script.is_file():
        if found and os.path.realpath(found) == os.path.realpath(script):
            return command
        prefix = shlex.quote(str(script))
    else:  # e.g. a user install whose scripts folder is not next to python
        if found:
            return command
        sub = program.removeprefix("kiqa").removeprefix("-")
        prefix = " ".join(filter(None, [shlex.quote(sys.executable), "-m kiqa.cli", sub]))
    return f"{prefix} {rest}".rstrip()


def _show_kiqa_warning(prog, seen):
    """A `warnings.showwarning` that prints kiqa's own warnings as one plain line, once."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not category.__module__.startswith("kiqa"):
            return original(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"{prog}: note: {text}", file=file or sys.stderr)
        return None

    return show


def entry_point(func):
    """Wraps a command's `main`: quiet TF, one error prefix, typed errors become exit 1.

    The prefix is the program the user typed (`kiqa-train: error: ...`, `kiqa score:
    error: ...`), and the same name is handed to the command's argparse parser.
    """

    @functools.wraps(func)
    def wrapper(argv=None, prog=None):
        prog = prog or program_name(func.__module__)
        quiet_tensorflow(verbose_requested(sys.argv[1:] if argv is None else argv))
        with warnings.catch_warnings():
            warnings.showwarning = _show_kiqa_warning(prog, set())
            try:
                return func(argv, prog=prog)
            except KiqaError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                if getattr(err, "ops", None) or getattr(err, "refused_ops", None):
                    print(f"{prog}: --unsafe skips the op check, for a SavedModel whose "
                          f"source you trust and whose ops you reviewed", file=sys.stderr)
                return EXIT_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED

    return wrapper


def add_model_arguments(parser):
    """The `--model`, `--image-size` and `--unsafe` flags of the commands that load a model.

    Returns:
        The argument group, for commands that add more model flags.
    """
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="a run directory (model.keras + config.json), a .keras file, or an "
                       "exported SavedModel (base path such as export/kiqa, or a version folder)")
    model.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                       help="size images are resized to (default: the size the model was trained "
                       "or exported at; needed for a bare .keras file without config.json)")
    model.add_argument("--unsafe", action="store_true",
                       help="load .keras files with Lambda layers (arbitrary code) and SavedModels "
                       "using ops outside kiqa's allow list: only for files you trust")
    return model


def print_model_warning(record, stream=None):
    """Prints on stderr, plainly, when a model's scores are not meaningful (or of unknown origin).

    Args:
        record: the model's `kiqa.provenance.Provenance`, or None when it has none.
        stream: where to print (default stderr).

    Returns:
        The printed sentence, or None when the model's provenance says it knows quality.
    """
    from kiqa.provenance import warning_for

    text = warning_for(record)
    if text:
        print(f"warning: {text}", file=stream or sys.stderr)
    return text
