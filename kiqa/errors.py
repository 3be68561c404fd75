"""Typed errors. Library code raises these; only `kiqa.cli` turns them into exit codes.

Every message names the thing that is wrong and the fix, because the user reading it
is usually hours into a run and looking at a log, not at the code.
"""


class KiqaError(Exception):
    """Base class of every error kiqa raises on purpose."""


class ConfigError(KiqaError):
    """A configuration value or flag is invalid."""


class DataError(KiqaError):
    """A label file, image name or image folder is unusable."""


class ImageError(DataError):
    """One image cannot be read or decoded. `path` names it when known."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class ModelError(KiqaError):
    """A model cannot be built, loaded or given its weights."""


class UntrustedModelError(ModelError):
    """A SavedModel uses ops outside kiqa's allow list; `ops` names them."""

    def __init__(self, message, path=None, ops=()):
        super().__init__(message)
        self.path = path
        self.ops = tuple(ops)


class ExportError(KiqaError):
    """A SavedModel export failed its checks; nothing was made visible to TF Serving."""


class ServingError(KiqaError):
    """A TF Serving endpoint is unreachable, has no such model, or rejected a request."""
