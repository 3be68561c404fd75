"""Atomic, versioned SavedModel export for TF Serving: the writer and its publish step.

`export_model` writes `<base>/<integer version>/` with three batch-first signatures
(leading dimension -1; more than `MAX_BATCH` images are refused in the graph):

- `serving_default`: `image_bytes` string[-1] (encoded files) -> `mos` float32[-1] on
  KonIQ's 0-100 scale. Decoding, EXIF turn and resize run in the graph through the
  function training used (`kiqa.image`). One bad item fails the request, and the
  message names every bad item (`image_bytes[2]: <why>`).
- `score_bytes_lenient`: the same input -> `mos` (NaN where an item failed) and `error`.
- `score_pixels`: `image` float32[-1, H, W, 3] (0..255, from `decode_image`) -> `mos`;
  NaN, infinite and out-of-range pixels are refused.

A distribution model (`TrainConfig.head` "distribution") adds `mos_sd` float32[-1] and
`dist` float32[-1, 5] to each of the three (NaN rows in the lenient signature where an
item failed), and the parity check covers them; clients reading only `mos` see no change.

A graph cannot catch a decoder's error except inside tf.data: headers are checked for
the whole batch first, and the decode half runs in a dataset whose `ignore_errors`
drops what the decoder refuses (see `_decode_batch`).

Why the export takes the path it does (serving/README.md has the figures):

- TF Serving loads any new all-digit folder at once, half-written or not (serving
  issues 631, 1086): a version is written to a dot-folder, loaded back, checked and
  renamed into place (`publish`); a kill leaves only the dot-folder, removed by the
  next export on the same host (`kiqa.serving.savedmodel.recover_interrupted`).
- Keras 3.15's `model.export()` stores every variable twice (keras issue 23553): here a
  plain `tf.Module` tracks the raw `tf.Variable`s once, and the export checks it.
- Every op must be on kiqa's allow list (`kiqa.serving.ops`): a request can never make
  the server read or write a path.
- The reloaded signatures must agree with the Keras model within `PARITY_TOLERANCE`.
- `assets.extra/` holds the warmup records (`kiqa.serving.warmup`), `kiqa.json` (size,
  pixel cap, versions, config, parity) and, when the run has one, `provenance.json`,
  also served by the `provenance` signature.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from kiqa import __version__, provenance
from kiqa.config import TrainConfig
from kiqa.contract import (
    ASSETS_EXTRA,
    BYTES_INPUT,
    BYTES_SIGNATURE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    DIST_OUTPUT,
    ERROR_OUTPUT,
    KONIQ_MOS_SLOPE,
    IMAGE_EXTENSIONS,
    LENIENT_SIGNATURE,
    MAX_BATCH,
    METADATA_FILE,
    WEIGHTS_KEY,
    MOS_OUTPUT,
    PARITY_BATCH,
    RATING_LEVELS,
    SD_OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    PROVENANCE_OUTPUT,
    PROVENANCE_SIGNATURE,
    QUALITY_MAP_OUTPUT,
    QUALITY_MAP_SIGNATURE,
    WARMUP_FILE,
)
from kiqa.errors import ConfigError, DefaultImageSizeWarning, ExportError, ImageError, ModelError
from kiqa.fsutil import publish_directory
from kiqa.image import (
    UNDECODABLE_MESSAGE,
    decode_image,
    decode_plan,
    describe_decode_error,
    header,
    read_image_bytes,
)
from kiqa.image.decode import decode_first_image
from kiqa.serving import savedmodel
from kiqa.serving.warmup import WARMUP_BATCH_SIZES, generated_images, warmup_requests, write_warmup_file

DEFAULT_BASE_PATH = "export/kiqa"

# Largest |SavedModel - Keras| allowed on the 0-100 scale. Both sides run the same
# decode and the same float32 weights; what differs is graph vs eager kernel choice
# (oneDNN may reorder sums), measured at ~1e-4 MOS. 0.05 is far below any meaningful
# quality difference (KonIQ's raters disagree by ~10 points) yet catches a wrong
# resize, a missing EXIF turn or a missing rescale, which move scores by whole points.
PARITY_TOLERANCE = 0.05

# Images decoded at once inside one request. Each holds its full decoded resolution as
# float32 before resizing (a 12 MP photo: ~140 MB), so this bounds a request's peak memory.
DECODE_PARALLELISM = 4

@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What every export format takes (`export_model`, `kiqa.serving.onnx.export_onnx`,
    `kiqa.serving.litert.export_litert`).

    Attributes:
        base_path: the model's base path; versions go to `<base_path>/<version>/`, and
            its last component is the model name served. None: the format's default.
        version: integer version (>= 1). None takes the next free one.
        image_size: (height, width) of the input. None takes the run's `config.json`;
            without one, 384x512 with a warning.
        max_pixels: header pixel cap. None takes the config's, else
            `kiqa.contract.DEFAULT_MAX_PIXELS`.
        overwrite: replace an existing version (never touched without it). TF Serving
            does not reload a version number it already serves: publish a new one.
        config: the `TrainConfig` the model was trained with, recorded in kiqa.json.
            None reads it from the run directory (or beside the `.keras` file).
        parity_images: image files, folders of images, or encoded bytes on which the
            export and the Keras model must agree; generated images are always added.
        safe_mode: refuse Lambda layers (`kiqa.model.load_model`) and, in a SavedModel,
            ops outside kiqa's allow list (`kiqa.serving.ops`).
    """

    base_path: Optional[str] = None
    version: Optional[int] = None
    image_size: Optional[Tuple[int, int]] = None
    max_pixels: Optional[int] = None
    overwrite: bool = False
    config: Optional[TrainConfig] = None
    parity_images: Optional[Sequence] = None
    safe_mode: bool = True

    @classmethod
    def of(cls, options: Optional["ExportOptions"] = None, **overrides: Any) -> "ExportOptions":
        """Options with some fields replaced.

        Args:
            options: the options to start from (default: all defaults).
            **overrides: field names and their new values.

        Returns:
            The `ExportOptions`.

        Raises:
            TypeError: `options` is not an `ExportOptions` (a base path given by
                position?), or a name is not one of its fields.
        """
        if options is None:
            options = cls()
        if not isinstance(options, cls):
            raise TypeError(f"options must be an ExportOptions, got {options!r}; pass base_path=... by name")
        return dataclasses.replace(options, **overrides) if overrides else options


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """The model an export reads, and the size and pixel cap it exports at."""

    model: keras.Model
    config: Optional[TrainConfig]
    source: str  # the .keras file, or "in-memory keras.Model"
    image_size: Tuple[int, int]
    max_pixels: int


def export_model(
    model_or_path: Union[str, os.PathLike, keras.Model], options: Optional[ExportOptions] = None, *,
    record: Optional[provenance.Provenance] = None, **overrides: Any,
) -> Path:
    """Exports a model as a new TF Serving version, atomically.

    Args:
        model_or_path: a run directory (holding `model.keras` and `config.json`), a
            `.keras` file, or an in-memory `keras.Model` from `kiqa.model.build_model`.
        options: `ExportOptions` (default base path "export/kiqa").
        record: the model's `kiqa.provenance.Provenance`. None reads it from the run
            directory (or beside the `.keras` file); an in-memory model without one
            is exported as of unknown provenance. Written to
            `assets.extra/provenance.json` and served by the `provenance` signature.
        **overrides: `ExportOptions` fields by name (`base_path=..., version=2`).

    Returns:
        The `Path` of the published version directory.

    Raises:
        ExportError: the version exists, or the written SavedModel failed a check
            (signatures, stored parameter count, ops outside the allow list, parity); nothing
            numeric was left in the base path.
        ModelError: the model cannot be loaded.
        ConfigError: an invalid version, image size or pixel cap.
        ImageError: a parity image cannot be read.
    """
    options = ExportOptions.of(options, **overrides)
    base = Path(options.base_path or DEFAULT_BASE_PATH)
    resolved = load_for_export(model_or_path, options, base)
    if record is None and not isinstance(model_or_path, keras.Model):
        record = provenance.find_for_model(resolved.source)
    parity_images = parity_inputs(options.parity_images)
    with staged_version(base, options.version, options.overwrite) as (version, temp, target):
        _write_saved_model(resolved.model, temp, resolved.image_size, resolved.max_pixels, record)
        report = savedmodel.check_saved_model(temp, resolved.image_size, check_ops=options.safe_mode)
        _check_stored_once(temp, resolved.model)
        loaded = tf.saved_model.load(str(temp))  # once for every parity check (~3.5 s a load)
        parity = _check_parity(resolved.model, loaded, parity_images, resolved.image_size, resolved.max_pixels)
        parity["quality_map"] = _check_map_parity(resolved.model, loaded, parity_images, resolved.image_size)
        write_warmup_file(temp / ASSETS_EXTRA / WARMUP_FILE, warmup_requests(base.resolve().name, WARMUP_BATCH_SIZES))
        metadata = common_metadata(resolved, base.resolve().name, version) | {
            "signatures": report["signatures"],
            "stored_parameters": savedmodel.stored_parameter_count(temp),
            "variables_bytes": _tree_size(temp / "variables"),
            "xla_must_compile_functions": report["xla_must_compile_functions"],
            "max_batch": MAX_BATCH,
            "ops_checked": bool(options.safe_mode),
            "parity": parity,
            "warmup_batch_sizes": list(WARMUP_BATCH_SIZES),
        }
        (temp / ASSETS_EXTRA / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if record is not None:
            provenance.write(temp / ASSETS_EXTRA, record)
    return target


def load_for_export(model_or_path, options, base):
    """Loads the model and settles its size and pixel cap, once the version is known free.

    An existing version is refused before the model is loaded (that can take a minute).

    Returns:
        A `ResolvedModel`.

    Raises:
        ExportError: the version exists (without `options.overwrite`).
        ModelError: the model cannot be loaded.
        ConfigError: an invalid version, image size or pixel cap.
    """
    if base.is_dir():
        savedmodel.recover_interrupted(base)
    savedmodel.choose_version(base, options.version, options.overwrite)
    model, config, source = _load_keras_model(model_or_path, options.config, options.safe_mode)
    image_size = _resolve_image_size(options.image_size, config, source)
    return ResolvedModel(model, config, source, image_size, _resolve_max_pixels(options.max_pixels, config))


def common_metadata(resolved, model_name, version):
    """The kiqa.json fields every export format records."""
    return {
        "model_name": model_name,
        "version": version,
        "image_size": list(resolved.image_size),
        "max_pixels": int(resolved.max_pixels),
        "parameters": int(resolved.model.count_params()),
        # Which weights these are, whatever the path: a scores CSV resumed with this
        # export must come from the same weights (kiqa.scoring.table).
        WEIGHTS_KEY: provenance.weights_fingerprint(np.asarray(w) for w in resolved.model.weights),
        "source": resolved.source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "kiqa_version": __version__,
        "config": resolved.config.to_dict() if resolved.config is not None else None,
    }


@contextlib.contextmanager
def staged_version(base, version, overwrite):
    """A temporary folder for one version, published when the block ends without error.

    The folder is a dot-folder beside the versions (`savedmodel.TEMP_PREFIX`, named by
    host and pid so that `savedmodel.recover_interrupted` can clean up after a kill).
    Whatever goes wrong inside the block (a failed check, Ctrl-C), it is deleted and no
    numeric folder is left.

    Yields:
        (version, temporary folder, final folder).

    Raises:
        ExportError: the version exists without `overwrite`, the base path cannot be
            created, or the publishing rename failed.
    """
    base = Path(base)
    if base.is_dir():
        savedmodel.recover_interrupted(base)
    version = savedmodel.choose_version(base, version, overwrite)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the export base path {base}: {err.strerror}") from err
    target = base / str(version)
    temp = base / f"{savedmodel.TEMP_PREFIX}{version}-{savedmodel.host_name()}-{os.getpid()}"
    temp.mkdir()
    try:
        yield version, temp, target
        publish(temp, target, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- the module


class _ServingModule(tf.Module):
    """The exported object: the model's raw `tf.Variable`s, tracked once, and three functions.

    The Keras model is held in a closure, not an attribute: a tracked Keras model would
    add its `keras.Variable` wrappers as second copies (keras issue 23553).
    """

    # Over 60 lines: the signatures are closures over one model, decoder and size; as methods or
    # module functions each would need them passed, and tf.function traces closures once.
    def __init__(self, model, image_size, max_pixels, record=None):
        super().__init__(name="kiqa_serving")
        weights = {}
        for i, weight in enumerate(model.weights):
            key = weight.path if weight.path not in weights else f"{weight.path}_{i}"
            weights[key] = raw_variable(weight)
        self.model_weights = weights
        size = (int(image_size[0]), int(image_size[1]))

        # A distribution model's extra outputs (mos_sd [b], dist [b, 5]) go into every
        # signature beside mos; a regression model's signatures are unchanged.
        extra_shapes = {SD_OUTPUT: [], DIST_OUTPUT: [RATING_LEVELS]} if DIST_OUTPUT in model.output_names else {}

        # `score` and `decode` are functions of their own, so the graph holds the model
        # and the decoder once however many signatures call them.
        @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)])
        def score(images):
            def run():
                outputs = model(images, training=False)
                mos = tf.reshape(tf.cast(outputs[MOS_OUTPUT], tf.float32), [-1])
                return (mos, *(tf.reshape(tf.cast(outputs[k], tf.float32), [-1, *shape])
                               for k, shape in extra_shapes.items()))

            def empty():
                return (tf.zeros([0], tf.float32), *(tf.zeros([0, *shape], tf.float32) for shape in extra_shapes.values()))

            # An empty batch would reach Conv2D, which fails on zero images in TF 2.21.
            # flatten: tf.cond may hand a one-element tuple back as the tensor itself.
            scored = tf.nest.flatten(tf.cond(tf.shape(images)[0] > 0, run, empty))
            return dict(zip((MOS_OUTPUT, *extra_shapes), scored))

        @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)])
        def score_pixels(image):
            with tf.control_dependencies([_check_batch(image, PIXELS_INPUT), _check_pixels(image)]):
                image = tf.identity(image)
            return score(image)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def decode(image_bytes):
            """(checked bytes, indices of the decoded items, their pixels, every item's error)."""
            with tf.control_dependencies([_check_batch(image_bytes, BYTES_INPUT)]):
                image_bytes = tf.identity(image_bytes)
            plans = _header_plans(image_bytes, size, max_pixels)
            # Items whose header passed but whose data the decoder refused are the ones
            # `_decode_batch` leaves out; their error is only known after decoding.
            index, images = _decode_batch(image_bytes, plans, size)
            return image_bytes, index, images, _decoder_errors(image_bytes, plans[0], index)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def score_bytes(image_bytes):
            _, _, images, errors = decode(image_bytes)
            with tf.control_dependencies([_check_no_errors(errors)]):
                return score(tf.identity(images))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def score_bytes_lenient(image_bytes):
            image_bytes, index, images, errors = decode(image_bytes)
            count = tf.shape(image_bytes)[0]
            scattered = {
                key: tf.tensor_scatter_nd_update(
                    tf.fill(tf.concat([[count], tf.shape(value)[1:]], 0), tf.constant(np.nan, tf.float32)),
                    index[:, None], value,
                )
                for key, value in score(images).items()
            }
            return {**scattered, ERROR_OUTPUT: errors}

        record_json = record.to_json() if record is not None else ""

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def provenance_record(request):
            return {PROVENANCE_OUTPUT: tf.fill(tf.shape(request), tf.constant(record_json))}

        # Concrete functions, traced here once: a tf.function attribute would be traced
        # again inside tf.saved_model.save (its save context is part of the tracing key),
        # and the graph would hold every function twice (7.3 MB instead of ~2.5 MB for
        # ConvNeXt-Tiny). The signatures are these same functions.
        self.score_pixels = score_pixels.get_concrete_function()
        self.score_bytes = score_bytes.get_concrete_function()
        self.score_bytes_lenient = score_bytes_lenient.get_concrete_function()
        self.provenance_record = provenance_record.get_concrete_function()
        quality_map = _quality_map_function(model, decode, size)
        self.quality_map = quality_map.get_concrete_function() if quality_map is not None else None


def _quality_map_function(model, decode, size):
    """The `quality_map` signature's function (`kiqa.maps`), or None for a model whose head
    is not affine after its pooling (the export then has no such signature).

    Same input, decoding, batch cap and all-or-nothing rule as serving_default, and one
    backbone pass: the map and `mos` come from the same feature map.
    """
    from kiqa import maps

    head = maps.maybe_map_head(model)
    if head is None:
        return None

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def quality_map(image_bytes):
        _, _, images, errors = decode(image_bytes)
        with tf.control_dependencies([_check_no_errors(errors)]):
            images = tf.identity(images)
        # An empty batch would reach Conv2D, which fails on zero images in TF 2.21: an empty
        # request maps one black image and returns none of it, which gives the grid its
        # shape. The cond only picks the input, so the head is traced (and stored) once.
        count = tf.shape(images)[0]
        batch = tf.cond(count > 0, lambda: images, lambda: tf.zeros([1, *size, 3], images.dtype))
        return {key: value[:count] for key, value in head(batch).items()}

    return quality_map


def _check_batch(tensor, key):
    """An in-graph refusal of batches over MAX_BATCH (INVALID_ARGUMENT in TF Serving too)."""
    return tf.debugging.assert_less_equal(
        tf.shape(tensor, out_type=tf.int64)[0],
        tf.constant(MAX_BATCH, tf.int64),
        message=f"{key}: a request holds at most {MAX_BATCH} images (kiqa's maximum batch); "
        f"send fewer per request",
    )


def _check_pixels(image):
    """Refuses NaN, infinite or out-of-range pixels, naming the first bad image.

    score_pixels takes what `decode_image` returns, 0..255; anything else is a client
    bug (pixels scaled to 0..1 or -1..1, 16-bit values, uninitialised memory) that would
    otherwise come back as a confident, meaningless score.
    """
    finite = tf.reduce_all(tf.math.is_finite(image), axis=[1, 2, 3])
    # NaN compares false either way, so in_range is false for NaN too.
    in_range = tf.reduce_all((image >= 0.0) & (image <= 255.0), axis=[1, 2, 3])
    good = finite & in_range
    # The first bad item (a trailing 0 keeps argmin defined on an empty batch).
    first = tf.argmin(tf.concat([tf.cast(good, tf.int32), [0]], 0), output_type=tf.int64)
    finite = tf.concat([finite, [True]], 0)
    what = tf.where(
        tf.gather(finite, first),
        tf.constant("values outside 0..255"),
        tf.constant("NaN or infinite values"),
    )
    message = tf.strings.join([
        f"{PIXELS_INPUT}[", tf.strings.as_string(first), "]: pixels must be finite 0..255 "
        "values (kiqa.image.decode_image's output), found ", what,
    ])
    return tf.debugging.Assert(tf.reduce_all(good), [message])


def _header_plans(image_bytes, size, max_pixels):
    """Per item: `check_header`'s message (empty where the header passes),
    `decode_plan`'s decoder branch and EXIF orientation, the header's size, and the
    bytes the decoder gets (`header.first_image`: a GIF cut after its first image)."""
    def one(contents):
        shape, _, message = header.header_problem(contents, max_pixels)
        branch, orientation = decode_plan(contents, shape, size)
        # A bad header's bytes never reach a decoder, nor the GIF walker.
        first = tf.cond(tf.equal(message, ""), lambda: header.first_image(contents), lambda: contents)
        return message, tf.cast(branch, tf.int32), tf.cast(orientation, tf.int32), shape, first

    return tf.map_fn(
        one, image_bytes,
        fn_output_signature=(tf.string, tf.int32, tf.int32, tf.int64, tf.string),
        parallel_iterations=DECODE_PARALLELISM,
    )


def _dataset_options():
    # Graph rewrites and autotuning pay off for long input pipelines, not for one
    # request's few items: turning them off halves the dataset's cost per request
    # (0.22 s -> 0.13 s measured on 2 busy CPU cores) and keeps the parallelism at
    # DECODE_PARALLELISM, which bounds a request's memory.
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return options


_DATASET_OPTIONS = _dataset_options()


def _decode_batch(image_bytes, plans, size):
    """Decodes the items whose header passed; returns (their indices, their pixels).

    A TF op error cannot be caught inside a graph, except by tf.data: the items run
    through a dataset whose `ignore_errors` drops an item the decoder refuses (a
    truncated or corrupt file whose header is fine) instead of failing the request.
    Only what can fail runs in it: tf.data instantiates its functions anew for every
    request, which for the whole image function (header parsers included) cost 1.7 s a
    request. The header half and `header.first_image` (the GIF walker) run before it
    (`_header_plans`), the filter of passed headers too, and the dataset's function is
    `decode_first_image`: decoder, size check, orientation, resize (~0.1 CPU-s a request
    of 8 KonIQ photos instead of ~0.6 with `decode_planned` in it, whose GIF walker and
    nested functions were instantiated every time). At most DECODE_PARALLELISM items are
    decoded at once, and items over the pixel cap never enter the dataset.
    """
    errors, branches, orientations, shapes, firsts = plans
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    passed = tf.equal(errors, "")
    items = tf.data.Dataset.from_tensor_slices(tuple(
        tf.boolean_mask(t, passed) for t in (tf.range(count), firsts, branches, orientations, shapes)))
    items = items.map(
        lambda i, first, branch, orientation, shape: (
            i, decode_first_image(first, branch, orientation, size, shape)),
        num_parallel_calls=DECODE_PARALLELISM,
        deterministic=True,
    )
    items = items.ignore_errors().batch(MAX_BATCH).with_options(_DATASET_OPTIONS)
    empty = (tf.zeros([0], tf.int64), tf.zeros([0, *size, 3], tf.float32))
    # At most one batch (a request holds at most MAX_BATCH items); none when every
    # item failed, when `empty` is the answer.
    return items.reduce(empty, lambda state, batch: batch)


def _decoder_errors(image_bytes, errors, index):
    """Adds the decoder's refusals (items with no header error that were not decoded)."""
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    decoded = tf.scatter_nd(index[:, None], tf.ones_like(index, tf.bool), [count])
    prefix, suffix = UNDECODABLE_MESSAGE.split("{reason}")
    refused = tf.strings.join([
        prefix, "the ", tf.map_fn(header.image_format, image_bytes), " decoder refused its data", suffix,
    ])
    return tf.where(tf.equal(errors, "") & ~decoded, refused, errors)


def _check_no_errors(errors):
    """serving_default's all-or-nothing rule: one bad item fails the request, naming it
    (`image_bytes[2]: ...`) and every other bad item."""
    bad = tf.where(tf.not_equal(errors, ""))[:, 0]
    named = tf.strings.join([
        f"{BYTES_INPUT}[", tf.strings.as_string(bad), "]: ", tf.gather(errors, bad),
    ])
    return tf.debugging.Assert(tf.size(bad) == 0, [tf.strings.reduce_join(named, separator="; ")])


def raw_variable(weight):
    """The `tf.Variable` behind a Keras weight (what a `tf.Module` must track to store it once)."""
    value = getattr(weight, "value", weight)
    if not isinstance(value, tf.Variable):
        raise ExportError(
            f"weight {weight.path!r} is not a TensorFlow variable ({type(value).__name__}); "
            f"export needs the TensorFlow backend (KERAS_BACKEND=tensorflow)"
        )
    return value


def _write_saved_model(model, directory, image_size, max_pixels, record=None):
    module = _ServingModule(model, image_size, max_pixels, record)
    try:
        tf.saved_model.save(
            module,
            str(directory),
            signatures={
                BYTES_SIGNATURE: module.score_bytes,
                LENIENT_SIGNATURE: module.score_bytes_lenient,
                PIXELS_SIGNATURE: module.score_pixels,
                PROVENANCE_SIGNATURE: module.provenance_record,
                **({QUALITY_MAP_SIGNATURE: module.quality_map} if module.quality_map is not None else {}),
            },
        )
    except (ValueError, TypeError, AssertionError, tf.errors.OpError) as err:
        raise ExportError(f"TensorFlow could not write the SavedModel to {directory}: {err}") from err


# ----------------------------------------------------------------------------- checks


def _weights_size(model):
    return sum(int(np.prod(w.shape)) for w in model.weights)


def _check_stored_once(directory, model):
    stored = savedmodel.stored_parameter_count(directory)
    expected = _weights_size(model)
    if stored != expected:
        raise ExportError(
            f"the SavedModel stores {stored} numbers but the model has {expected} weights: "
            f"variables are stored {'twice' if stored == 2 * expected else 'inconsistently'} "
            f"(keras issue 23553); nothing was published"
        )


def parity_inputs(parity_images):
    """(name, bytes) pairs: the caller's images followed by generated ones, and the
    number of the caller's."""
    items = []
    for item in parity_images or ():
        if isinstance(item, (bytes, bytearray)):
            items.append((f"parity image {len(items)}", bytes(item)))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ImageError(f"parity image folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} files", path=str(path))
            items.extend((str(p), read_image_bytes(p)) for p in files)
        else:
            items.append((str(path), read_image_bytes(path)))
    return items + generated_images(), len(items)


def _check_parity(model, loaded, parity, image_size, max_pixels):
    inputs, caller_images = parity
    names = [name for name, _ in inputs]
    pixels = []
    for name, contents in inputs:
        try:
            pixels.append(decode_image(contents, image_size, max_pixels))
        except tf.errors.OpError as err:
            raise ExportError(
                f"parity image {name} cannot be decoded ({describe_decode_error(err)}); "
                f"remove it from the parity images"
            ) from err
    by_keras, by_bytes, by_pixels, by_lenient = [], [], [], []
    for start in range(0, len(inputs), PARITY_BATCH):
        batch = tf.stack(pixels[start : start + PARITY_BATCH])
        contents = tf.constant([c for _, c in inputs[start : start + PARITY_BATCH]])
        by_keras.append(np.reshape(model(batch, training=False)[MOS_OUTPUT], [-1]))
        try:
            by_bytes.append(loaded.signatures[BYTES_SIGNATURE](**{BYTES_INPUT: contents})[MOS_OUTPUT].numpy())
            by_pixels.append(loaded.signatures[PIXELS_SIGNATURE](**{PIXELS_INPUT: batch})[MOS_OUTPUT].numpy())
            by_lenient.append(_lenient_parity(loaded, contents, names[start : start + PARITY_BATCH]))
        except tf.errors.OpError as err:
            raise ExportError(
                f"the reloaded SavedModel failed on the parity images: {describe_decode_error(err)}"
            ) from err
    by_keras, by_bytes, by_pixels, by_lenient = (
        np.concatenate(a).astype(np.float64) for a in (by_keras, by_bytes, by_pixels, by_lenient)
    )
    if not all(np.all(np.isfinite(a)) for a in (by_keras, by_bytes, by_pixels, by_lenient)):
        raise ExportError("the model returns NaN or infinite scores on the parity images; it is not fit to serve")
    diffs = {
        "bytes": np.abs(by_bytes - by_keras),
        "pixels": np.abs(by_pixels - by_keras),
        "lenient": np.abs(by_lenient - by_keras),
    }
    worst = int(np.argmax(np.maximum.reduce(list(diffs.values()))))
    if max(d.max() for d in diffs.values()) > PARITY_TOLERANCE:
        raise ExportError(
            f"parity check failed: on {names[worst]} the Keras model says {by_keras[worst]:.3f} "
            f"but the SavedModel says {by_bytes[worst]:.3f} (bytes) / {by_pixels[worst]:.3f} "
            f"(pixels) / {by_lenient[worst]:.3f} (lenient bytes), over the {PARITY_TOLERANCE} "
            f"MOS tolerance; nothing was published"
        )
    report = {
        "images": len(inputs),
        "caller_images": caller_images,
        "max_abs_diff_bytes": float(diffs["bytes"].max()),
        "max_abs_diff_pixels": float(diffs["pixels"].max()),
        "max_abs_diff_lenient": float(diffs["lenient"].max()),
        "tolerance": PARITY_TOLERANCE,
    }
    if DIST_OUTPUT in model.output_names:
        report.update(_distribution_parity(model, loaded, pixels, [c for _, c in inputs]))
    return report


# The shares' tolerance: one rating level is KONIQ_MOS_SLOPE points of MOS, so a share
# off by this much moves mos by at most PARITY_TOLERANCE.
SHARE_PARITY_TOLERANCE = PARITY_TOLERANCE / KONIQ_MOS_SLOPE


def _distribution_parity(model, loaded, pixels, contents):
    """Checks mos_sd and the shares of every signature against the Keras model.

    Returns:
        dict max_abs_diff_mos_sd and max_abs_diff_dist (over the bytes, pixels and lenient
        signatures).

    Raises:
        ExportError: an output differs by more than its tolerance.
    """
    worst = {SD_OUTPUT: 0.0, DIST_OUTPUT: 0.0}
    for start in range(0, len(pixels), PARITY_BATCH):
        batch = tf.stack(pixels[start : start + PARITY_BATCH])
        files = tf.constant(contents[start : start + PARITY_BATCH])
        keras_outputs = model(batch, training=False)
        for signature, kwargs in ((PIXELS_SIGNATURE, {PIXELS_INPUT: batch}), (BYTES_SIGNATURE, {BYTES_INPUT: files}),
                                  (LENIENT_SIGNATURE, {BYTES_INPUT: files})):
            served = loaded.signatures[signature](**kwargs)
            for key in worst:
                diff = float(np.max(np.abs(np.asarray(served[key], np.float64) - np.asarray(keras_outputs[key]))))
                worst[key] = max(worst[key], diff if np.isfinite(diff) else np.inf)
    for key, tolerance in ((SD_OUTPUT, PARITY_TOLERANCE), (DIST_OUTPUT, SHARE_PARITY_TOLERANCE)):
        if worst[key] > tolerance:
            raise ExportError(
                f"parity check failed: the SavedModel's {key!r} differs from the Keras model's by "
                f"{worst[key]:.4g}, over the {tolerance:.4g} tolerance; nothing was published"
            )
    return {f"max_abs_diff_{key}": value for key, value in worst.items()}


def _check_map_parity(model, loaded, parity, image_size):
    """The `quality_map` signature against the Keras model's map on the parity images.

    Returns:
        {"max_abs_diff": float} in MOS points, or None when the export has no map signature.

    Raises:
        ExportError: they differ by more than PARITY_TOLERANCE.
    """
    from kiqa import maps

    if QUALITY_MAP_SIGNATURE not in loaded.signatures:
        return None
    inputs, _ = parity
    keras_maps = maps.map_function(model, image_size)
    worst = 0.0
    for start in range(0, len(inputs), PARITY_BATCH):
        chunk = inputs[start : start + PARITY_BATCH]
        pixels = tf.stack([decode_image(contents, image_size) for _, contents in chunk])
        served = loaded.signatures[QUALITY_MAP_SIGNATURE](**{BYTES_INPUT: tf.constant([c for _, c in chunk])})
        diff = np.abs(served[QUALITY_MAP_OUTPUT].numpy() - keras_maps(pixels)[QUALITY_MAP_OUTPUT].numpy())
        worst = max(worst, float(diff.max()))
    if worst > PARITY_TOLERANCE:
        raise ExportError(
            f"parity check failed: the {QUALITY_MAP_SIGNATURE} signature's maps differ from the "
            f"Keras model's by up to {worst:.4f} MOS, over the {PARITY_TOLERANCE} tolerance; "
            f"nothing was published"
        )
    return {"max_abs_diff": worst}


# Put among each parity batch of the lenient signature: it must come back NaN with an
# error, and must not change its neighbours' scores.
_NOT_AN_IMAGE = b"kiqa parity check: not an image"


def _lenient_parity(loaded, contents, names):
    """The lenient signature's scores of `contents`, checked to isolate a bad item."""
    with_bad = tf.concat([contents[:1], tf.constant([_NOT_AN_IMAGE]), contents[1:]], axis=0)
    result = loaded.signatures[LENIENT_SIGNATURE](**{BYTES_INPUT: with_bad})
    mos, errors = result[MOS_OUTPUT].numpy(), result[ERROR_OUTPUT].numpy()
    if not (np.isnan(mos[1]) and errors[1]):
        raise ExportError(
            f"the {LENIENT_SIGNATURE} signature scored a non-image ({mos[1]}, error {errors[1]!r}) "
            f"instead of returning NaN and an error; nothing was published"
        )
    bad = [(n, e.decode("utf-8", "replace")) for n, e in zip(names, np.delete(errors, 1)) if e]
    if bad:
        raise ExportError(
            f"the {LENIENT_SIGNATURE} signature refused parity image {bad[0][0]}: {bad[0][1]}; "
            f"nothing was published"
        )
    return np.delete(mos, 1)


# ----------------------------------------------------------------------------- inputs


def _load_keras_model(model_or_path, config, safe_mode):
    """(keras model, TrainConfig or None, description of the source)."""
    from kiqa import model as kiqa_model

    if isinstance(model_or_path, keras.Model):
        return model_or_path, config, "in-memory keras.Model"
    from kiqa.run import resolve_model  # the one model-path resolver

    path = Path(model_or_path)
    resolved = resolve_model(path)  # the one lookup of a model's config.json (kiqa.run)
    if resolved.kind != "keras":
        raise ModelError(f"{path} is a {resolved.kind} export, not a run directory or a .keras file")
    if config is None:
        config = resolved.config()
    return kiqa_model.load_model(resolved.model, safe_mode=safe_mode), config, str(resolved.model)


def _resolve_image_size(image_size, config, source):
    if image_size is None:
        if config is not None:
            return tuple(config.image_size)
        warnings.warn(
            DefaultImageSizeWarning(
                f"{source} has no config.json beside it; exporting at {DEFAULT_IMAGE_SIZE[0]}x"
                f"{DEFAULT_IMAGE_SIZE[1]} (HxW), kiqa's default: give the size the model was "
                f"trained at if it differs",
                source=source, image_size=DEFAULT_IMAGE_SIZE,
            ),
            stacklevel=4,  # the caller of export_model / export_onnx / export_litert
        )
        return DEFAULT_IMAGE_SIZE
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"image_size must be (height, width), got {image_size!r}") from err
    if min(height, width) < 32:
        raise ConfigError(f"image_size must be at least 32x32 pixels, got {height}x{width}")
    if config is not None and (height, width) != tuple(config.image_size):
        warnings.warn(
            f"exporting at {height}x{width} but the model was trained at "
            f"{config.image_size[0]}x{config.image_size[1]}; scores shift with image size",
            stacklevel=4,  # the caller of export_model / export_onnx / export_litert
        )
    return (height, width)


def _resolve_max_pixels(max_pixels, config):
    if max_pixels is None:
        return config.max_pixels if config is not None else DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive pixel count, got {max_pixels!r}")
    return int(max_pixels)


# ----------------------------------------------------------------------------- publish


def publish(temp, target, overwrite):
    """Flushes the checked temporary folder and renames it to its version number (atomic)."""
    _fsync_tree(temp)
    if target.exists() and not overwrite:
        raise ExportError(
            f"{target} appeared while exporting (another export running?); nothing was "
            f"published; rerun to take the next free version"
        )
    # An overwrite takes two renames: a kill between them leaves the old version aside
    # (restored by the next export) and the new one in its dot-directory, never a
    # half-written version.
    aside = target.parent / f"{savedmodel.ASIDE_PREFIX}{target.name}-{savedmodel.host_name()}-{os.getpid()}"
    try:
        publish_directory(temp, target, replace=overwrite, aside=aside)
    except OSError as err:
        raise ExportError(
            f"cannot publish {target}: {err.strerror} (another export took this version?); "
            f"nothing was published; rerun to take the next free version"
        ) from err
    _fsync_path(target.parent)


def _fsync_path(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    # Some file systems (e.g. certain network mounts) refuse fsync on directories; the
    # rename is still atomic there, only durability across a power cut is weaker.
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _fsync_tree(root):
    """Flushes every file and folder so the rename never publishes unwritten blocks."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def _tree_size(root):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
