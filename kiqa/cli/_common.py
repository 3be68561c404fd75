"""What every command shares: a quiet console, error reporting and exit codes."""

import errno
import functools
import os
import shlex
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path

from kiqa.cli.remedies import command_of, remedy_for
from kiqa.console import quiet_tensorflow
from kiqa.console import verbose_requested as _verbose_env
from kiqa.errors import KiqaError


def verbose_requested(argv=()):
    """Whether the user asked to see TF's own output: `--verbose` (kiqa-train) or KIQA_VERBOSE=1."""
    return "--verbose" in argv or _verbose_env()


EXIT_OK = 0
EXIT_ERROR = 1  # kiqa refused: bad input, bad config (message says what to fix)
EXIT_PARTIAL = 3  # the job finished but some inputs failed (listed in its output)
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by it
# What to do after an interruption, a full disk or a read-only output, per command that resumes.
RESUME_HINTS = {
    "kiqa score": "rerun the same command to resume: files already in the CSV are skipped",
    "kiqa compare": "rerun the same command to resume: images already scored are skipped",
    "kiqa-train": "rerun the same command to resume from the last completed epoch",
    "kiqa fetch-koniq": "rerun the same command to resume the downloads where they stopped",
}
RESUME_HINTS["kiqa train"] = RESUME_HINTS["kiqa-train"]  # `kiqa train` runs the same command

# Console scripts with their own name (setup.cfg); every other command is `kiqa <command>`.
SCRIPT_NAMES = {"train": "kiqa-train", "evaluate": "kiqa-evaluate", "export": "kiqa-export"}
_COMMAND_NAMES = {"fetch": "fetch-koniq", "serve_dev": "serve-dev"}


def program_name(module_name):
    """The name a user types for a command module: `kiqa-train`, `kiqa score`, ...

    Args:
        module_name: e.g. "kiqa.cli.train".
    """
    command = command_of(_real_module_name(module_name))
    return SCRIPT_NAMES.get(command) or f"kiqa {_COMMAND_NAMES.get(command, command.replace('_', '-'))}"


def _real_module_name(module_name):
    """"kiqa.cli.train" for "__main__" when run as `python -m kiqa.cli.train`."""
    if module_name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        return spec.name if spec else "kiqa"
    return module_name
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's stop, `docker stop`), raised where Ctrl-C would be, so
    every cleanup that runs for Ctrl-C (flushed rows, Keras' backups) runs for it too."""


def _raise_terminated(signum, frame):
    raise Terminated()


def describe_os_error(err):
    """One line for an `OSError` that reached a command: the path, the reason and the fix."""
    from kiqa.fsutil import printable

    where = printable(err.filename) if err.filename else "a file"
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space there or write somewhere else"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable location"
    else:
        fix = "check the path"
    return f"{where}: {reason}; {fix}"


def entry_point(func):
    """Wraps a command's `main`: quiet TF, one error prefix, typed errors become exit 1.

    The prefix is the program the user typed (`kiqa-train: error: ...`, `kiqa score:
    error: ...`), and the same name is handed to the command's argparse parser. A typed
    error is followed by its remedy in this command's flags (`kiqa.cli.remedies`), if any.
    """
    command = command_of(_real_module_name(func.__module__))

    @functools.wraps(func)
    def wrapper(argv=None, prog=None):
        prog = prog or program_name(func.__module__)
        quiet_tensorflow(verbose_requested(sys.argv[1:] if argv is None else argv))
        hint = RESUME_HINTS.get(prog)
        # SIGTERM only in the main thread (Python's rule); a test calling main() elsewhere keeps its own.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        with warnings.catch_warnings():
            warnings.showwarning = _show_kiqa_warning(prog, set())
            try:
                return func(argv, prog=prog)
            except KiqaError as err:
                from kiqa.errors import DiskFullError, OutputError

                remedy = remedy_for(err, command)
                # An error whose message ends in a fix in Python's words (`facts` is the message
                # without it) is shown with this command's fix instead.
                facts = getattr(err, "facts", None) if remedy else None
                print(f"{prog}: error: {facts or err}", file=sys.stderr)
                if remedy:
                    print(f"{prog}: hint: {remedy}", file=sys.stderr)
                if hint and isinstance(err, (DiskFullError, OutputError)):
                    print(f"{prog}: then {hint}", file=sys.stderr)
                return EXIT_ERROR
            except OSError as err:
                # An ordinary fault (read-only folder, full disk, permissions) that no typed
                # check caught: one line with the path and the fix, not a traceback.
                print(f"{prog}: error: {describe_os_error(err)}", file=sys.stderr)
                if hint:
                    print(f"{prog}: then {hint}", file=sys.stderr)
                return EXIT_ERROR
            except KeyboardInterrupt as err:
                terminated = isinstance(err, Terminated)
                how = "stopped by SIGTERM" if terminated else "interrupted"
                print(f"{prog}: {how}" + (f"; {hint}" if hint else ""), file=sys.stderr)
                return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
            finally:
                if main_thread and previous is not None:
                    signal.signal(signal.SIGTERM, previous)

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
