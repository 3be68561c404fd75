"""TensorFlow's error messages without the wrapping TF puts around an op's own words.

TF wraps an op's message in graph context ("Graph execution error:", "Detected at
node", "{{function_node ...}}", "[Op:DecodeJpeg]", "[[node ...]]"); kiqa's in-graph
checks sit inside "assertion failed: [...]". Strings in, strings out: no TensorFlow
import, so the CLI and the gRPC client's error paths can use it cheaply.
"""

import re

_ASSERTION = re.compile(r"assertion failed: \[(.*?)\]\s*(?:\n|\[\[|\[Op:|$)", re.S)
# An eager op's error ends "[Op:DecodeImage] name: <op name>" (empty when unnamed).
_WRAPPERS = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\](?: name:[ ]?\S*)?|\s*\[\[.*$", re.S)
# Lines only the Python runtime adds (TF Serving, in C++, sends none of them).
# A SavedModel's functions carry no Python stack: "<stack traces unavailable>" instead.
_PYTHON_PREAMBLE = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
# Lines around the op's own message: the preamble, Python frames and node names.
_CONTEXT = _PYTHON_PREAMBLE + ("File ", "[[")


def error_text(err):
    """The message of a `tf.errors.OpError` (its `message`), or `str` of any other exception."""
    return getattr(err, "message", None) or str(err)


def clean_tf_message(message, fallback="unknown error"):
    """The op's own words in a TF error message, as one line.

    Args:
        message: the text of a TF error (an OpError's, or TF Serving's gRPC details).
        fallback: returned when nothing is left.

    Returns:
        The assertion's text for kiqa's in-graph checks, else the first line that is
        not context, with TF's node and op wrappers removed.
    """
    match = _ASSERTION.search(message)
    if match:
        text = match.group(1)
    else:
        lines = [line.strip() for line in message.splitlines()]
        lines = [line for line in lines if line and not line.startswith(_CONTEXT)]
        text = _WRAPPERS.sub("", lines[0] if lines else "")
    return text.strip() or fallback


def without_python_preamble(message, fallback="unknown error"):
    """A TF error message as TF Serving would send it: the Python runtime's lines removed."""
    lines = [line for line in message.splitlines() if line.strip() and not line.strip().startswith(_PYTHON_PREAMBLE)]
    return "\n".join(lines) or fallback
