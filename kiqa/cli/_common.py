"""What every command shares: a quiet console, error reporting and exit codes."""

import contextlib
import functools
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

from kiqa.console import (  # noqa: F401  (the CLI's names for the console rules)
    _ABSL_PREAMBLE,
    DEFAULT_TF_LOG_LEVEL,
    VERBOSE_ENV,
    filter_tf_output,
    quiet_tensorflow,
    verbose_requested,
)
from kiqa.errors import KiqaError

EXIT_OK = 0
EXIT_ERROR = 1  # kiqa refused: bad input, bad config (message says what to fix)
EXIT_PARTIAL = 3  # the job finished but some inputs failed (listed in its output)
EXIT_INTERRUPTED = 130

# Console scripts with their own name (setup.cfg); every other command is `kiqa <command>`.
SCRIPT_NAMES = {"train": "kiqa-train", "evaluate": "kiqa-evaluate", "export": "kiqa-export"}
_COMMAND_NAMES = {"fetch": "fetch-koniq", "serve_dev": "serve-dev"}


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


@contextlib.contextmanager
def labels_remedies():
    """A label file that does not exist: perhaps mistyped, perhaps KonIQ was never fetched."""
    from kiqa.errors import LabelsNotFoundError

    try:
        yield
    except LabelsNotFoundError as err:
        raise LabelsNotFoundError(
            f"{err}; check --labels, or download KonIQ-10k first: kiqa fetch-koniq DIR (then "
            f"--labels DIR/koniq10k_distributions_sets.csv)", path=err.path,
        ) from err


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
