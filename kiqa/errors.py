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
    """A model cannot be built, loaded or given its weights. `path` names it when known."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class ModelNotFoundError(ModelError):
    """A model path does not exist; `path` names it."""


class ImageSizeError(ModelError):
    """A model was asked for an image size it cannot take, or its size is unknown.

    Attributes:
        path: the model.
        requested: the (height, width) asked for, or None.
        expected: the (height, width) the model takes, or None when unknown.
    """

    def __init__(self, message, path=None, requested=None, expected=None):
        super().__init__(message, path=path)
        self.requested, self.expected = requested, expected


class BatchMemoryError(ModelError):
    """A batch of images does not fit in memory; `batch_size` is how many it held."""

    def __init__(self, message, path=None, batch_size=None):
        super().__init__(message, path=path)
        self.batch_size = batch_size


class RunExistsError(ConfigError):
    """A run folder holds a run that a new one must not mix with.

    Attributes:
        run_dir: the folder.
        changed: the config fields that differ (empty when a finished run is simply there).
        finished: whether that run finished (False: it trained, stopped, and resumes only
            with the same config).
    """

    def __init__(self, message, run_dir, changed, finished=True):
        super().__init__(message)
        self.run_dir, self.changed, self.finished = run_dir, tuple(changed), finished


class UntrustedModelError(ModelError):
    """A SavedModel uses ops outside kiqa's allow list; `ops` names them."""

    def __init__(self, message, path=None, ops=()):
        super().__init__(message)
        self.path = path
        self.ops = tuple(ops)


class PrecisionParityError(ModelError):
    """A reduced-precision engine moved scores further from float32 than its bound.

    Attributes:
        path: the model.
        engine: the engine refused (e.g. "openvino-bf16").
        figures: the parity measured on the images: max_abs_diff, mean_abs_diff, srcc,
            images, and the bounds (tolerance, min_srcc).
        image: the image of the largest difference.
    """

    def __init__(self, message, path=None, engine=None, figures=None, image=None):
        super().__init__(message, path=path)
        self.engine, self.figures, self.image = engine, dict(figures or {}), image


class ExportError(KiqaError):
    """A SavedModel export failed its checks; nothing was made visible to TF Serving."""


class ServingError(KiqaError):
    """A TF Serving endpoint is unreachable, has no such model, or rejected a request."""


class NotScoresCsvError(DataError):
    """An output file to resume exists but is not a kiqa scores CSV; `path` names it."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class ImageFolderError(DataError):
    """(Almost) none of a label file's images are in the image folder: the folder is wrong
    or the images were never downloaded.

    Attributes:
        folder: the image folder searched.
        n_missing: images not found there.
        n_images: images the label file lists.
        first_missing: the first missing `image_name`.
    """

    def __init__(self, message, folder, n_missing, n_images, first_missing):
        super().__init__(message)
        self.folder, self.n_missing, self.n_images, self.first_missing = folder, n_missing, n_images, first_missing


class DiskFullError(KiqaError):
    """A folder has too little free space for what must be written there.

    Attributes:
        folder: the folder written to.
        needed: bytes that must be free (an estimate), or None when unknown.
        free: bytes free when the write failed or was refused.
    """

    def __init__(self, message, folder, needed, free):
        super().__init__(message)
        self.folder, self.needed, self.free = folder, needed, free


class ScoresFromAnotherModelError(ConfigError):
    """An output folder holds scores written by another model (or image size).

    Attributes:
        folder: the output folder.
        previous: the identity of the model that wrote them (None when unreadable).
        current: the identity of the model given now.
    """

    def __init__(self, message, folder, previous, current):
        super().__init__(message)
        self.folder, self.previous, self.current = folder, previous, current


class VersionExistsError(ExportError):
    """The export version asked for exists and overwriting was not allowed.

    Attributes:
        base: the model base path.
        version: the version asked for.
        existing: the versions there.
        next_free: the next free version number.
    """

    def __init__(self, message, base, version, existing, next_free):
        super().__init__(message)
        self.base, self.version, self.existing, self.next_free = base, version, tuple(existing), next_free


class MessageTooLargeError(ServingError):
    """A request or an answer exceeds a gRPC message limit.

    Attributes:
        limit: the client's message limit in bytes.
        size: the bytes that did not fit, or None when the server did not say.
    """

    def __init__(self, message, limit, size=None):
        super().__init__(message)
        self.limit, self.size = limit, size


class DefaultImageSizeWarning(UserWarning):
    """A model is exported at kiqa's default size because no config says its training size.

    Attributes:
        source: the model file.
        image_size: the (height, width) used.
    """

    def __init__(self, message, source, image_size):
        super().__init__(message)
        self.source, self.image_size = source, tuple(image_size)


class WeightsError(ModelError):
    """The backbone's weights cannot be had: not downloadable, no such file, or a file that
    does not fit the variant. The message states the fact; `kiqa.cli.train` names the flags.

    Attributes:
        variant: the ConvNeXt size asked for ("tiny" ...).
        weights: what was asked for: "imagenet" or the weights file's path.
        problem: "download" (ImageNet weights not downloadable), "missing" (no such file)
            or "mismatch" (the file does not fit the variant).
    """

    def __init__(self, message, variant, weights, problem):
        super().__init__(message)
        self.variant, self.weights, self.problem = variant, weights, problem


class StrategyError(ConfigError):
    """A distribution strategy cannot run with this backend or cluster set-up.

    Attributes:
        strategy: the strategy asked for ("multi-worker", "data-parallel", ...).
        backend: the Keras backend of the process ("tensorflow" or "jax").
        alternative: the strategy that does the job instead, or None.
    """

    def __init__(self, message, strategy, backend, alternative=None):
        super().__init__(message)
        self.strategy, self.backend, self.alternative = strategy, backend, alternative


class ClusterError(ConfigError):
    """A multi-process run is missing a coordinator address, a process count or an index.

    Attributes:
        missing: names of what is missing ("coordinator address", "number of processes",
            "process index").
    """

    def __init__(self, message, missing=()):
        super().__init__(message)
        self.missing = tuple(missing)
