"""Typed errors. Library code raises these; only `kiqa.cli` turns them into exit codes.

Every message names the thing that is wrong and the fix, because the user reading it
is usually hours into a run and looking at a log, not at the code. The fix is said in the
library's terms (arguments, files); the attributes carry the facts, from which
`kiqa.cli.remedies` says the command-line flags that fix it.
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


class EvaluationExistsError(ConfigError):
    """An output folder holds an evaluation made with other labels, settings or model weights.

    Attributes:
        out_dir: the folder.
        previous: what the earlier evaluation recorded ({"labels": ..., "model": ...}).
        current: the same for this one.
    """

    def __init__(self, message, out_dir, previous, current):
        super().__init__(message)
        self.out_dir, self.previous, self.current = out_dir, previous, current


class UntrustedModelError(ModelError):
    """A SavedModel uses ops outside kiqa's allow list; `ops` names them."""

    def __init__(self, message, path=None, ops=()):
        super().__init__(message)
        self.path = path
        self.ops = tuple(ops)


class LambdaLayerError(ModelError):
    """A `.keras` file holds a `keras.layers.Lambda` (arbitrary Python code), which safe mode
    refuses; `path` names the file."""


class ModelMetadataError(UntrustedModelError):
    """A model's metadata (an export's kiqa.json) disagrees with the model itself or with
    kiqa's own limits; `path` names the file, `field` the key (e.g. "image_size")."""

    def __init__(self, message, path=None, field=None):
        super().__init__(message, path=path)
        self.field = field


class ModelTooLargeError(UntrustedModelError):
    """A model file would inflate past kiqa's bound when loaded; `path` names it,
    `inflated` is what it would inflate to (bytes) and `limit` the bound."""

    def __init__(self, message, path=None, inflated=None, limit=None):
        super().__init__(message, path=path)
        self.inflated, self.limit = inflated, limit


class QualityMapError(ModelError):
    """A quality map cannot be made: the model's head is not affine after its global pooling
    (`layer` names the layer), an export has no `quality_map` signature, or two maps differ
    in grid."""

    def __init__(self, message, path=None, layer=None):
        super().__init__(message, path=path)
        self.layer = layer


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


class UntrustedExportError(ExportError):
    """A SavedModel failed its checks because its graph uses ops outside kiqa's allow list.

    Attributes:
        refused_ops: the ops refused.
    """

    def __init__(self, message, refused_ops=()):
        super().__init__(message)
        self.refused_ops = tuple(refused_ops)


class ServingError(KiqaError):
    """A TF Serving endpoint is unreachable, has no such model, or rejected a request."""


class ServingStatusError(ServingError):
    """A gRPC call to a TF Serving endpoint failed with a status code.

    Attributes:
        code: the gRPC status name ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND",
            "FAILED_PRECONDITION", ...), or "QUEUE_FULL" for a full batching queue.
        server: the server's "host:port".
        model: the model name asked for.
        signature: the signature asked for.
        timeout: the client's timeout in seconds.
    """

    def __init__(self, message, code, server, model, signature, timeout):
        super().__init__(message)
        self.code, self.server, self.model, self.signature, self.timeout = code, server, model, signature, timeout


class SignatureError(ServingError):
    """A served model has no such signature, or one that does not take and give what kiqa's
    client sends and reads.

    Attributes:
        server: the server's "host:port".
        model: the model name.
        version: the served version.
        signature: the signature asked for.
        available: the signatures the version has.
        problem: "missing" (no such signature) or "mismatch" (wrong inputs or outputs).
    """

    def __init__(self, message, server, model, version, signature, available, problem):
        super().__init__(message)
        self.server, self.model, self.version, self.signature = server, model, version, signature
        self.available, self.problem = tuple(available), problem


class NoExportError(ServingError):
    """A model base path to serve from does not exist; `base_path` names it."""

    def __init__(self, message, base_path):
        super().__init__(message)
        self.base_path = base_path


class PortError(ServingError):
    """A server cannot listen on its address.

    Attributes:
        address: the "host:port" asked for.
        reason: why, as the socket layer said it.
    """

    def __init__(self, message, address, reason):
        super().__init__(message)
        self.address, self.reason = address, reason


class NotScoresCsvError(DataError):
    """An output file to resume exists but is not a kiqa scores CSV; `path` names it."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class BadImagesError(DataError):
    """Images of a label file cannot be used, and the bad-image policy stops the run.

    Attributes:
        n_bad: the unusable images.
        n_images: the images the label file lists.
        policy: "stop" (`on_bad_images="stop"`: any bad image stops) or "too_many" (more
            than `max_bad_fraction` of them are bad).
        max_bad_fraction: the fraction allowed.
    """

    def __init__(self, message, n_bad, n_images, policy, max_bad_fraction):
        super().__init__(message)
        self.n_bad, self.n_images, self.policy, self.max_bad_fraction = n_bad, n_images, policy, max_bad_fraction


class NoOfficialSplitError(DataError):
    """A label file has no `set` column, so it has no official split; `path` names it."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class LabelsNotFoundError(DataError):
    """A label file does not exist; `path` names it."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class DownloadError(DataError):
    """A server refused a download.

    Attributes:
        name: the file being downloaded.
        url: the address asked.
        status: the HTTP status code.
    """

    def __init__(self, message, name, url, status):
        super().__init__(message)
        self.name, self.url, self.status = name, url, status


class ChecksumError(DataError):
    """A downloaded file is not what was expected (it has been deleted).

    Attributes:
        name: the file.
        problem: "size" or "sha256".
        expected: the expected size or digest.
        actual: the size or digest received.
    """

    def __init__(self, message, name, problem, expected, actual):
        super().__init__(message)
        self.name, self.problem, self.expected, self.actual = name, problem, expected, actual


class UnsafeArchiveError(DataError):
    """An archive has members that would be written outside the folder, or links.

    Attributes:
        archive: the archive file.
        members: the unsafe members (the first ten).
    """

    def __init__(self, message, archive, members):
        super().__init__(message)
        self.archive, self.members = archive, tuple(members)


class SetTooSmallError(DataError):
    """A split leaves a part with too few images for correlations.

    Attributes:
        part: "training", "validation" or "test".
        size: images in that part.
        n_images: images in the whole set.
        minimum: images the whole set needs at these fractions (None for the official split).
        facts: the message without its fix (a command states its own).
    """

    def __init__(self, message, part, size, n_images, minimum=None, facts=None):
        super().__init__(message)
        self.part, self.size, self.n_images, self.minimum = part, size, n_images, minimum
        self.facts = facts


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
    """An output folder or scores CSV holds scores written by another model (or image size).

    Attributes:
        folder: the output folder.
        previous: the identity of the model that wrote them (None when unreadable).
        current: the identity of the model given now.
        path: the scores CSV, when one file is concerned (else None).
    """

    def __init__(self, message, folder, previous, current, path=None):
        super().__init__(message)
        self.folder, self.previous, self.current, self.path = folder, previous, current, path


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
        facts: the message without the fix in Python's words (a command states its own
            fix after it); None means the whole message.
    """

    def __init__(self, message, variant, weights, problem, facts=None):
        super().__init__(message)
        self.variant, self.weights, self.problem = variant, weights, problem
        self.facts = facts


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


class OutputError(KiqaError, OSError):
    """An output file cannot be written: a read-only or missing folder, no permission, a
    full disk. Also an `OSError` (errno and filename set), so callers that catch those
    still do.

    Attributes:
        path: the file kiqa was writing.
        reason: what the system said ("Read-only file system", ...).
    """

    def __init__(self, message, path, errno_=None, reason=None):
        OSError.__init__(self, errno_, message, str(path))
        self.path, self.reason = str(path), reason
        self.message = message

    def __str__(self):
        return self.message


class OutputIsInputError(DataError):
    """An output would be written over a file kiqa only reads (an input image) or over a
    file kiqa did not write; `path` names it and nothing was changed."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


class OutputLockedError(ConfigError):
    """Another kiqa process is writing the same output now.

    Attributes:
        path: the output.
        pid: the other process's id (None when its lock file does not say).
    """

    def __init__(self, message, path, pid=None):
        super().__init__(message)
        self.path, self.pid = str(path), pid


class DownloadDeadlineError(DataError):
    """A download did not finish within its overall deadline; the bytes received are kept.

    Attributes:
        url: what was being downloaded.
        deadline: the seconds allowed.
        received: bytes kept for a rerun to resume after.
    """

    def __init__(self, message, url, deadline, received):
        super().__init__(message)
        self.url, self.deadline, self.received = url, deadline, received
