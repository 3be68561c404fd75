"""A quiet console: TensorFlow's start-up noise hidden, for every way into kiqa.

The commands (`kiqa.cli`), `import kiqa` in a script, and the notebooks follow one rule:
TF's C++ log lines below ERROR and the lines its shared libraries print while they load
(absl's preamble, "oneDNN custom operations are on", "Could not find cuda drivers",
`cuInit` errors on machines without a GPU) are not shown; `KIQA_VERBOSE=1` (or the
commands' verbose switch, see `kiqa.cli`) shows everything. Imported by `kiqa/__init__.py`, so it stays
standard library only.
"""

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile

# KIQA_VERBOSE=1 shows TF's own console output untouched (the commands add a switch for it).
VERBOSE_ENV = "KIQA_VERBOSE"
# TF's C++ log levels: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR. 3 by default: on a
# machine without a GPU, TF logs "failed call to cuInit" and "oneDNN supports DT_UINT8 only
# on platforms with AVX-512" at ERROR level on every run; real failures reach Python as
# exceptions, which kiqa reports.
DEFAULT_TF_LOG_LEVEL = "3"
# An absl/TF C++ log line: severity letter, MMDD, time, thread, file:line].
_CPP_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:. ]+\s+\d+ [^\]]+\] ")
_SEVERITIES = "IWEF"
# A Python warning as `warnings` prints it: "path.py:12: UserWarning: ...".
_PYTHON_WARNING = re.compile(r"^\S.*:\d+: \w*(Warning|Error)\b")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def verbose_requested() -> bool:
    """Whether the user asked to see TF's own output (KIQA_VERBOSE set, and not to 0)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


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
        verbose: show everything: also undoes an earlier quiet call of this process (e.g.
            `import kiqa` before a command parsed its verbose switch), as long as TF is
            not loaded yet.
    """
    if verbose:
        _undo_quiet()
        return
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = DEFAULT_TF_LOG_LEVEL
        _STATE["set_level"] = True
    # TF's Python-side logger ("tensorflow") and absl's carry deprecation and retracing
    # notes meant for library authors; kiqa's own messages use other loggers.
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


_STATE = {"set_level": False}


def _undo_quiet():
    if _STATE["set_level"] and "tensorflow" not in sys.modules:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        _STATE["set_level"] = False
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietImport)]
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.NOTSET)


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
