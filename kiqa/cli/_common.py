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
                       help="load .keras files with Lambda layers (arbitrary code): only for files you trust")
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
