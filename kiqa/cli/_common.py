"""What every command shares: error reporting and exit codes."""

import functools
import os
import sys

from kiqa.errors import KiqaError

EXIT_OK = 0
EXIT_ERROR = 1  # kiqa refused: bad input, bad config (message says what to fix)
EXIT_USAGE = 2  # argparse's own code for bad flags
EXIT_PARTIAL = 3  # the job finished but some inputs failed (listed in its output)
EXIT_INTERRUPTED = 130


def quiet_tensorflow():
    """Hides TF's C++ start-up chatter (oneDNN notes, missing CUDA) unless asked for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def entry_point(func):
    """Wraps a command's `main`: typed kiqa errors become one line on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(argv=None, prog=None):
        quiet_tensorflow()
        try:
            return func(argv, prog=prog)
        except KiqaError as err:
            print(f"{prog or 'kiqa'}: error: {err}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print(f"{prog or 'kiqa'}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper
