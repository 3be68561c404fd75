"""Atomic, versioned SavedModel export for TF Serving.

`export_model` turns a trained model (a run directory or a `.keras` file) into TF
Serving's layout, `<base>/<integer version>/`, with three signatures, all batch-first
with a leading dimension of -1 (TF Serving's batching concatenates requests on it), and
each refusing more than `MAX_BATCH` images in its graph (INVALID_ARGUMENT on TF Serving
too, before anything is decoded):

- `serving_default`: `image_bytes` string[-1] (encoded JPEG/PNG/GIF/BMP/WebP files;
  REST clients send each as `{"b64": ...}`) -> `mos` float32[-1] on KonIQ's 0-100
  scale. Decoding, EXIF orientation and resizing run in the graph through the
  function training used (`kiqa.image`), so there is no train/serve skew. One bad item
  fails the request (TF Serving's semantics) with InvalidArgumentError, and the
  message names every bad item: `image_bytes[2]: <why>` for kiqa's header checks
  (empty, not an image, TIFF, over `max_pixels`, ...) and for a decoder's refusal
  (truncated or corrupt data) alike. Nothing over the pixel cap is decoded.
- `score_bytes_lenient`: the same input -> `mos` float32[-1] (NaN for an item that
  failed) and `error` string[-1] (empty when scored, else the same words as
  `kiqa score`'s error column). One bad upload costs the others nothing.
- `score_pixels`: `image` float32[-1, H, W, 3] (0..255, already decoded and resized
  with `decode_image` at the export's size) -> `mos` float32[-1]. NaN, infinite and
  out-of-range pixels are refused, naming the first bad image (`image[1]: ...`).

How a graph survives a decoder's error: it cannot catch one, except inside tf.data.
The header half of the image function (`decode_plan`, `imageinfo.header_problem`)
runs for the whole batch first; the items that pass go through a dataset running the
decode half (`decode_planned`) whose `ignore_errors` drops an item the decoder
refuses; the items missing from its output are the decoder's refusals. TF's own
message for those is lost (it is logged, not returned), so the error names the format
instead. This costs ~0.13 s per request on 2 busy CPU cores (tf.data instantiates its
function per request).

Why the export takes the path it does:

- TF Serving polls the base path (every second by default) and loads any new
  all-digit directory at once, half-written or not (serving issues 631, 1086). So the
  version is written to a dot-directory beside the target (`.tmp-<version>-<host>-<pid>`,
  which TF Serving ignores: it only loads directories whose names are integers), loaded
  back, checked, and only then renamed into place with one `os.rename` (atomic on one
  file system). A failure at any step deletes the temporary directory; a `kill -9`
  leaves only that dot-directory, which the next export on the same host removes.
- `model.export()` and `keras.export.ExportArchive.track(model)` store every variable
  twice in Keras 3.15 (keras issue 23553: the `keras.Variable` wrappers and the raw
  `tf.Variable`s the traced function captures are different trackables, so TF's
  checkpoint cannot de-duplicate them; a 28M-parameter ConvNeXt-Tiny exports at 216 MB
  instead of 109 MB, and TF Serving holds both copies in memory). Here a plain
  `tf.Module` tracks the raw `tf.Variable`s once and its `tf.function`s call the Keras
  model, so the function captures the very objects the module tracks and every weight
  is stored once; the export checks the stored parameter count against the model.
- Every op of the exported graph and its function library must be on kiqa's allow
  list (`kiqa.serving.ops`), so a request can never make the server read or write a
  path (`ReadFile`, `TextLineDataset`, `SaveV2` in a signature, ...). The bytes
  signatures take bytes, not paths.
- Before the rename, the reloaded SavedModel's bytes signature and the Keras model must
  agree within `PARITY_TOLERANCE` MOS points on real photos (the caller's) and on
  generated JPEG/PNG images.
- `assets.extra/tf_serving_warmup_requests` holds PredictionLog records, one per bytes
  signature and batch size TF Serving's batching pads to, so the first real request of
  each size is not the slow one; `assets.extra/kiqa.json` records the image size, pixel cap, TF/Keras/kiqa
  versions, the training config and the parity result.
- `assets.extra/provenance.json` and a third signature, `provenance`, carry the model's
  provenance record (`kiqa.provenance`) when the run has one; see `PROVENANCE_SIGNATURE`.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from kiqa import __version__, provenance
from kiqa.config import TrainConfig
from kiqa.contract import (
    ASSETS_EXTRA,
    BYTES_INPUT,
    BYTES_SIGNATURE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    ERROR_OUTPUT,
    IMAGE_EXTENSIONS,
    LENIENT_SIGNATURE,
    MAX_BATCH,
    MAX_REQUEST_BYTES,
    METADATA_FILE,
    MOS_OUTPUT as OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    PROVENANCE_INPUT,
    PROVENANCE_OUTPUT,
    PROVENANCE_SIGNATURE,
    WARMUP_FILE,
)
from kiqa.errors import ConfigError, ExportError, ImageError, ModelError
from kiqa.fsutil import swap_directory
from kiqa.serving import ops as serving_ops
from kiqa.image import header as imageinfo
from kiqa.image import (
    IMAGE_EXTENSIONS,
    UNDECODABLE_MESSAGE,
    decode_image,
    decode_plan,
    decode_planned,
    describe_decode_error,
    read_image_bytes,
)
DEFAULT_BASE_PATH = "export/kiqa"

# Largest |SavedModel - Keras| allowed on the 0-100 scale. Both sides run the same
# decode and the same float32 weights; what differs is graph vs eager kernel choice
# (oneDNN may reorder sums), measured at ~1e-4 MOS. 0.05 is far below any meaningful
# quality difference (KonIQ's raters disagree by ~10 points) yet catches a wrong
# resize, a missing EXIF turn or a missing rescale, which move scores by whole points.
PARITY_TOLERANCE = 0.05

# One warmup record per batch size that serving/batching_parameters.txt pads to
# (allowed_batch_sizes): on a GPU each new shape pays cuDNN autotuning once.
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32)

# Images decoded at once inside one request. Each holds its full decoded resolution as
# float32 before resizing (a 12 MP photo: ~140 MB), so this bounds a request's peak memory.
DECODE_PARALLELISM = 4
# Images per forward pass in the parity check.
_PARITY_BATCH = 8
_TEMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".old-"


# ----------------------------------------------------------------------------- public API


def export_model(
    model_or_path,
    base_path=DEFAULT_BASE_PATH,
    version=None,
    image_size=None,
    max_pixels=None,
    overwrite=False,
    config=None,
    parity_images=None,
    safe_mode=True,
    record=None,
):
    """Exports a model as a new TF Serving version, atomically.

    Args:
        model_or_path: a run directory (holding `model.keras` and `config.json`), a
            `.keras` file, or an in-memory `keras.Model` from `kiqa.model.build_model`.
        base_path: the model's base path; versions go to `<base_path>/<version>/`. Its
            last component is the model name TF Serving serves it under (default
            "kiqa").
        version: integer version (>= 1). None takes the next free one (1 + the largest).
        image_size: (height, width) the signatures resize to. None takes the run's
            `config.json`; without one, 384x512 with a warning.
        max_pixels: header pixel cap of the bytes signature. None takes the config's,
            else `kiqa.contract.DEFAULT_MAX_PIXELS`.
        overwrite: replace an existing version. Without it an existing version is never
            touched. TF Serving does not reload a version number it already serves, so
            publish a new version to roll out a new model.
        config: the `TrainConfig` the model was trained with, recorded in kiqa.json.
            None reads it from the run directory (or beside the `.keras` file).
        parity_images: image files, folders of images, or encoded bytes on which the
            SavedModel and the Keras model must agree; generated JPEG/PNG images are
            always added.
        safe_mode: refuse Lambda layers (`kiqa.model.load_model`) and ops outside
            kiqa's allow list in the written SavedModel (`kiqa.serving.ops`).
        record: the model's `kiqa.provenance.Provenance`. None reads it from the run
            directory (or beside the `.keras` file); an in-memory model without one
            is exported as of unknown provenance. Written to
            `assets.extra/provenance.json` and served by the `provenance` signature.

    Returns:
        The `Path` of the published version directory.

    Raises:
        ExportError: the version exists, or the written SavedModel failed a check
            (signatures, stored parameter count, ops outside the allow list, parity); nothing
            numeric was left in `base_path`.
        ModelError: the model cannot be loaded.
        ConfigError: an invalid version, image size or pixel cap.
        ImageError: a parity image cannot be read.
    """
    base = Path(base_path)
    if base.is_dir():
        _recover_interrupted(base)
    # Refuse an existing version before spending a minute loading the model.
    version = _choose_version(base, version, overwrite)
    model, config, source = _resolve_model(model_or_path, config, safe_mode)
    if record is None and not isinstance(model_or_path, keras.Model):
        record = provenance.find_for_model(source)
    image_size = _resolve_image_size(image_size, config, source)
    max_pixels = _resolve_max_pixels(max_pixels, config)
    parity_inputs = _parity_inputs(parity_images)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the export base path {base}: {err.strerror}") from err
    target = base / str(version)
    temp = base / f"{_TEMP_PREFIX}{version}-{_host()}-{os.getpid()}"
    model_name = base.resolve().name

    try:
        _write_saved_model(model, temp, image_size, max_pixels, record)
        report = check_saved_model(temp, image_size, check_ops=safe_mode)
        _check_stored_once(temp, model)
        parity = _check_parity(model, temp, parity_inputs, image_size, max_pixels)
        warmup = warmup_requests(model_name, WARMUP_BATCH_SIZES)
        write_warmup_file(temp / ASSETS_EXTRA / WARMUP_FILE, warmup)
        metadata = {
            "model_name": model_name,
            "version": version,
            "image_size": list(image_size),
            "max_pixels": int(max_pixels),
            "signatures": report["signatures"],
            "parameters": int(model.count_params()),
            "stored_parameters": stored_parameter_count(temp),
            "variables_bytes": _tree_size(temp / "variables"),
            "xla_must_compile_functions": report["xla_must_compile_functions"],
            "max_batch": MAX_BATCH,
            "ops_checked": bool(safe_mode),
            "parity": parity,
            "warmup_batch_sizes": list(WARMUP_BATCH_SIZES),
            "source": source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tf_version": tf.__version__,
            "keras_version": keras.__version__,
            "kiqa_version": __version__,
            "config": config.to_dict() if config is not None else None,
        }
        (temp / ASSETS_EXTRA / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if record is not None:
            provenance.write(temp / ASSETS_EXTRA, record)
        _fsync_tree(temp)
        _publish(temp, target, overwrite)
    except BaseException:
        # Whatever went wrong (a failed check, Ctrl-C), no numeric directory is left.
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def list_versions(base_path):
    """The versions TF Serving would see under `base_path`: all-digit directory names.

    Args:
        base_path: a model base path.

    Returns:
        Sorted list of ints (empty when the folder is missing or has no versions).
    """
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and p.is_dir())


def check_saved_model(path, image_size=None, check_ops=True):
    """Checks an exported version like TF Serving and `saved_model_cli scan` would see it.

    Reads `saved_model.pb` only (no variables), so it is cheap.

    Args:
        path: a version directory (or the temporary directory before publishing).
        image_size: expected (height, width) of the pixel signature; None skips that.
        check_ops: refuse ops outside kiqa's allow list (`kiqa.serving.ops`). Only a
            caller who reviewed the model turns it off.

    Returns:
        dict with "signatures" ({name: {"inputs": {key: [dtype, shape]}, "outputs":
        ...}}) and "xla_must_compile_functions" (functions TF must XLA-compile; slow on
        CPU, see DESIGN.md).

    Raises:
        ExportError: unreadable file, no "serve" graph, wrong or missing signatures,
            or ops outside the allow list (`kiqa.serving.ops`), each named (and
            listed in the error's `refused_ops`).
    """
    meta_graph = read_meta_graph(path)
    signatures = describe_signatures(meta_graph)
    problems = []
    if image_size is None:  # any fixed size is fine: read it from the signature itself
        shape = signatures.get(PIXELS_SIGNATURE, {}).get("inputs", {}).get(PIXELS_INPUT, [None, []])[1]
        image_size = shape[1:3] if len(shape) == 4 else (-1, -1)
    height, width = (int(v) for v in image_size)
    expected = {
        BYTES_SIGNATURE: ({BYTES_INPUT: ["DT_STRING", [-1]]}, {OUTPUT: ["DT_FLOAT", [-1]]}),
        LENIENT_SIGNATURE: (
            {BYTES_INPUT: ["DT_STRING", [-1]]},
            {ERROR_OUTPUT: ["DT_STRING", [-1]], OUTPUT: ["DT_FLOAT", [-1]]},
        ),
        PIXELS_SIGNATURE: (
            {PIXELS_INPUT: ["DT_FLOAT", [-1, height, width, 3]]}, {OUTPUT: ["DT_FLOAT", [-1]]},
        ),
    }
    for name, (inputs, outputs) in expected.items():
        found = signatures.get(name)
        if found is None:
            problems.append(f"signature {name!r} is missing (found {sorted(signatures)})")
            continue
        if found["inputs"] != inputs or found["outputs"] != outputs:
            problems.append(
                f"signature {name!r} is {found['inputs']} -> {found['outputs']}, expected "
                f"{inputs} -> {outputs}"
            )
        if meta_graph.signature_def[name].method_name != "tensorflow/serving/predict":
            problems.append(f"signature {name!r} is not a Predict signature")
    refused = serving_ops.refused_ops(meta_graph) if check_ops else []
    if refused:
        problems.append(
            f"the graph uses ops outside kiqa's allow list {refused} (kiqa.serving.ops): a "
            f"SavedModel is a program, and these may touch the server's files, network or "
            f"logs; remove them from the model, or review them and extend the allow list"
        )
    if problems:
        error = ExportError(f"SavedModel {path} failed its checks: " + "; ".join(problems))
        error.refused_ops = tuple(refused)
        raise error
    return {
        "signatures": signatures,
        "xla_must_compile_functions": _count_xla_must_compile(meta_graph),
    }


def describe_signatures(meta_graph):
    """Signature inputs and outputs of a MetaGraphDef as plain data.

    Args:
        meta_graph: a `MetaGraphDef` proto.

    Returns:
        {name: {"inputs": {key: [dtype name, shape]}, "outputs": {...}}}, with -1 for
        unknown dimensions (as `saved_model_cli show` prints them).
    """
    def tensors(infos):
        return {
            key: [_dtype_name(info.dtype), [int(d.size) for d in info.tensor_shape.dim]]
            for key, info in sorted(infos.items())
        }

    return {
        name: {"inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)}
        for name, sig in sorted(meta_graph.signature_def.items())
        if not name.startswith("__")  # __saved_model_init_op is bookkeeping, not a signature
    }


def ops_used(meta_graph):
    """Every op type in a MetaGraphDef: its graph and all its library functions (calls
    of library functions by name are not ops and are left out)."""
    functions = {f.signature.name for f in meta_graph.graph_def.library.function}
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops - functions


def stored_parameter_count(path):
    """Numbers stored in a SavedModel's variables checkpoint (the object graph excluded).

    Args:
        path: a version directory.

    Returns:
        int, the sum of the stored variables' sizes; equals the model's parameter count
        when every weight is stored once.
    """
    prefix = str(Path(path) / "variables" / "variables")
    return sum(
        int(np.prod(shape))
        for name, shape in tf.train.list_variables(prefix)
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )


def read_export_metadata(path):
    """Reads `assets.extra/kiqa.json` of a version directory.

    Raises:
        ExportError: the file is missing or not JSON (not a kiqa export).
    """
    file = Path(path) / ASSETS_EXTRA / METADATA_FILE
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise ExportError(f"{file} not found: {path} is not a kiqa export (run kiqa export)") from err
    except json.JSONDecodeError as err:
        raise ExportError(f"{file} is not valid JSON: {err}") from err


def generated_images(count=6, seed=0):
    """Small synthetic photos-like images, encoded, for parity checks and warmup.

    Smooth gradients, shapes and noise at varied sizes and aspect ratios, half JPEG and
    half PNG, so decode, resize and the model all see varied input.

    Args:
        count: number of images.
        seed: seeds the content.

    Returns:
        list of (name, bytes).
    """
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (96, 72), (120, 160), (64, 200), (150, 100), (80, 80)]
    images = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-2, 2, size=(2, 3))
        pixels = base + y[..., None] * slope[0] + x[..., None] * slope[1]
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 40)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        pixels[disc] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, rng.uniform(0, 25), size=pixels.shape)
        pixels = tf.constant(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 2 == 0:
            images.append((f"generated-{i}.jpg", tf.io.encode_jpeg(pixels, quality=int(rng.integers(20, 95))).numpy()))
        else:
            images.append((f"generated-{i}.png", tf.io.encode_png(pixels).numpy()))
    return images


def warmup_requests(model_name, batch_sizes=WARMUP_BATCH_SIZES):
    """PredictionLog records for TF Serving's warmup file, one per bytes signature and batch size.

    Args:
        model_name: the model name in the requests' ModelSpec.
        batch_sizes: number of images in each record.

    Returns:
        list of `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    images = [contents for _, contents in generated_images(max(batch_sizes), seed=1)]
    logs = []
    # TF Serving batches each signature in its own queue, so each warms up on its own.
    for signature in (BYTES_SIGNATURE, LENIENT_SIGNATURE):
        for size in batch_sizes:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(images[:size], dtype=tf.string, shape=[size]))
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup_file(path, logs):
    """Writes PredictionLog records as the TFRecord file TF Serving replays at load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def read_warmup_file(path):
    """Reads the PredictionLog records of a warmup file.

    Raises:
        ExportError: the file is missing or holds something else than PredictionLogs.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"warmup file {path} not found")
    try:
        return [
            prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))
        ]
    except (tf.errors.OpError, ValueError) as err:
        raise ExportError(f"warmup file {path} is not a TFRecord file of PredictionLogs: {err}") from err


# ----------------------------------------------------------------------------- the module


class _ServingModule(tf.Module):
    """The exported object: the model's raw `tf.Variable`s, tracked once, and three functions.

    The Keras model is held in a closure, not an attribute: a tracked Keras model would
    add its `keras.Variable` wrappers as second copies (keras issue 23553).
    """

    def __init__(self, model, image_size, max_pixels, record=None):
        super().__init__(name="kiqa_serving")
        weights = {}
        for i, weight in enumerate(model.weights):
            key = weight.path if weight.path not in weights else f"{weight.path}_{i}"
            weights[key] = _raw_variable(weight)
        self.model_weights = weights
        size = (int(image_size[0]), int(image_size[1]))

        def score(images):
            def run():
                mos = model(images, training=False)[OUTPUT]
                return tf.reshape(tf.cast(mos, tf.float32), [-1])

            # An empty batch would reach Conv2D, which fails on zero images in TF 2.21.
            return tf.cond(tf.shape(images)[0] > 0, run, lambda: tf.zeros([0], tf.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)])
        def score_pixels(image):
            with tf.control_dependencies([_check_batch(image, PIXELS_INPUT), _check_pixels(image)]):
                image = tf.identity(image)
            return {OUTPUT: score(image)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def score_bytes(image_bytes):
            with tf.control_dependencies([_check_batch(image_bytes, BYTES_INPUT)]):
                image_bytes = tf.identity(image_bytes)
            plans = _header_plans(image_bytes, size, max_pixels)
            # Items whose header passed but whose data the decoder refused are the ones
            # `_decode_batch` leaves out; their error is only known after decoding.
            index, images = _decode_batch(image_bytes, plans, size)
            errors = _decoder_errors(image_bytes, plans[0], index)
            with tf.control_dependencies([_check_no_errors(errors)]):
                return {OUTPUT: score(tf.identity(images))}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def score_bytes_lenient(image_bytes):
            with tf.control_dependencies([_check_batch(image_bytes, BYTES_INPUT)]):
                image_bytes = tf.identity(image_bytes)
            plans = _header_plans(image_bytes, size, max_pixels)
            index, images = _decode_batch(image_bytes, plans, size)
            errors = _decoder_errors(image_bytes, plans[0], index)
            count = tf.shape(image_bytes)[0]
            mos = tf.tensor_scatter_nd_update(
                tf.fill([count], tf.constant(np.nan, tf.float32)), index[:, None], score(images)
            )
            return {OUTPUT: mos, ERROR_OUTPUT: errors}

        record_json = record.to_json() if record is not None else ""

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def provenance_record(request):
            return {PROVENANCE_OUTPUT: tf.fill(tf.shape(request), tf.constant(record_json))}

        self.score_pixels = score_pixels
        self.score_bytes = score_bytes
        self.score_bytes_lenient = score_bytes_lenient
        self.provenance_record = provenance_record


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
    `decode_plan`'s decoder branch and EXIF orientation, and the header's size."""
    def one(contents):
        shape, _, message = imageinfo.header_problem(contents, max_pixels)
        branch, orientation = decode_plan(contents, shape, size)
        return message, tf.cast(branch, tf.int32), tf.cast(orientation, tf.int32), shape

    return tf.map_fn(
        one, image_bytes,
        fn_output_signature=(tf.string, tf.int32, tf.int32, tf.int64),
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
    Only the decode half of the image function (`decode_planned`) runs in it: tf.data
    instantiates its functions anew for every request, which for the whole function
    (header parsers included) cost 1.7 s a request; the decode half costs ~0.13 s (the
    price of naming every bad item, measured on 2 busy CPU cores). At most
    DECODE_PARALLELISM items are decoded at once, and items over the pixel cap never
    enter the dataset.
    """
    errors, branches, orientations, shapes = plans
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    items = tf.data.Dataset.from_tensor_slices(
        (tf.range(count), image_bytes, errors, branches, orientations, shapes))
    items = items.filter(lambda i, contents, error, branch, orientation, shape: tf.equal(error, ""))
    items = items.map(
        lambda i, contents, error, branch, orientation, shape: (
            i, decode_planned(contents, branch, orientation, size, shape)),
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
        prefix, "the ", tf.map_fn(imageinfo.image_format, image_bytes), " decoder refused its data", suffix,
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


def _raw_variable(weight):
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
                BYTES_SIGNATURE: module.score_bytes.get_concrete_function(),
                LENIENT_SIGNATURE: module.score_bytes_lenient.get_concrete_function(),
                PIXELS_SIGNATURE: module.score_pixels.get_concrete_function(),
                PROVENANCE_SIGNATURE: module.provenance_record.get_concrete_function(),
            },
        )
    except (ValueError, TypeError, AssertionError, tf.errors.OpError) as err:
        raise ExportError(f"TensorFlow could not write the SavedModel to {directory}: {err}") from err


# ----------------------------------------------------------------------------- checks


def read_meta_graph(path):
    """The "serve" MetaGraphDef of a SavedModel directory (what TF Serving loads).

    Raises:
        ExportError: no readable saved_model.pb, or no "serve" graph in it.
    """
    file = Path(path) / "saved_model.pb"
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    except OSError as err:
        raise ExportError(f"{file} cannot be read: {err.strerror}") from err
    except Exception as err:  # protobuf's DecodeError has no stable import path
        raise ExportError(f"{file} is not a SavedModel: {err}") from err
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ExportError(f"{file} has no MetaGraph tagged 'serve', which TF Serving loads")


def _dtype_name(enum_value):
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum_value)


def _count_xla_must_compile(meta_graph):
    return sum(
        1
        for function in meta_graph.graph_def.library.function
        if function.attr.get("_XlaMustCompile") is not None and function.attr["_XlaMustCompile"].b
    )


def _weights_size(model):
    return sum(int(np.prod(w.shape)) for w in model.weights)


def _check_stored_once(directory, model):
    stored = stored_parameter_count(directory)
    expected = _weights_size(model)
    if stored != expected:
        raise ExportError(
            f"the SavedModel stores {stored} numbers but the model has {expected} weights: "
            f"variables are stored {'twice' if stored == 2 * expected else 'inconsistently'} "
            f"(keras issue 23553); nothing was published"
        )


def _parity_inputs(parity_images):
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


def _check_parity(model, directory, parity_inputs, image_size, max_pixels):
    inputs, caller_images = parity_inputs
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
    loaded = tf.saved_model.load(str(directory))
    by_keras, by_bytes, by_pixels, by_lenient = [], [], [], []
    for start in range(0, len(inputs), _PARITY_BATCH):
        batch = tf.stack(pixels[start : start + _PARITY_BATCH])
        contents = tf.constant([c for _, c in inputs[start : start + _PARITY_BATCH]])
        by_keras.append(np.reshape(model(batch, training=False)[OUTPUT], [-1]))
        try:
            by_bytes.append(loaded.signatures[BYTES_SIGNATURE](**{BYTES_INPUT: contents})[OUTPUT].numpy())
            by_pixels.append(loaded.signatures[PIXELS_SIGNATURE](**{PIXELS_INPUT: batch})[OUTPUT].numpy())
            by_lenient.append(_lenient_parity(loaded, contents, names[start : start + _PARITY_BATCH]))
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
    return {
        "images": len(inputs),
        "caller_images": caller_images,
        "max_abs_diff_bytes": float(diffs["bytes"].max()),
        "max_abs_diff_pixels": float(diffs["pixels"].max()),
        "max_abs_diff_lenient": float(diffs["lenient"].max()),
        "tolerance": PARITY_TOLERANCE,
    }


# Put among each parity batch of the lenient signature: it must come back NaN with an
# error, and must not change its neighbours' scores.
_NOT_AN_IMAGE = b"kiqa parity check: not an image"


def _lenient_parity(loaded, contents, names):
    """The lenient signature's scores of `contents`, checked to isolate a bad item."""
    with_bad = tf.concat([contents[:1], tf.constant([_NOT_AN_IMAGE]), contents[1:]], axis=0)
    result = loaded.signatures[LENIENT_SIGNATURE](**{BYTES_INPUT: with_bad})
    mos, errors = result[OUTPUT].numpy(), result[ERROR_OUTPUT].numpy()
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


def _resolve_model(model_or_path, config, safe_mode):
    """(keras model, TrainConfig or None, description of the source)."""
    from kiqa import model as kiqa_model

    if isinstance(model_or_path, keras.Model):
        return model_or_path, config, "in-memory keras.Model"
    from kiqa.run import resolve_model

    path = Path(model_or_path)
    if path.is_dir() and not (path / "model.keras").is_file():
        raise ModelError(
            f"run directory {path} has no model.keras (the run may not have finished); "
            f"pass {path / 'checkpoints' / 'best.keras'} to export the best checkpoint"
        )
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
            f"{source} has no config.json beside it; exporting at {DEFAULT_IMAGE_SIZE[0]}x"
            f"{DEFAULT_IMAGE_SIZE[1]} (HxW). Pass the size the model was trained at "
            f"(--image-size H W) if it differs",
            stacklevel=3,
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
            stacklevel=3,
        )
    return (height, width)


def _resolve_max_pixels(max_pixels, config):
    if max_pixels is None:
        return config.max_pixels if config is not None else DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive pixel count, got {max_pixels!r}")
    return int(max_pixels)


# ----------------------------------------------------------------------------- versions


def _choose_version(base, version, overwrite):
    existing = list_versions(base)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ConfigError(f"version must be a positive integer, got {version!r}")
    version = int(version)
    if version in existing and not overwrite:
        raise ExportError(
            f"version {version} already exists in {base} (versions: {existing}); pick another "
            f"--version (next free: {existing[-1] + 1}), or pass --overwrite to replace it"
        )
    return version


def _publish(temp, target, overwrite):
    """Renames the checked temporary directory to its version number (atomic)."""
    if target.exists():
        if not overwrite:
            raise ExportError(
                f"{target} appeared while exporting (another export running?); nothing was "
                f"published; rerun to take the next free version"
            )
        # Two renames: a kill between them leaves the old version aside (restored by the
        # next export) and the new one in its dot-directory, never a half-written version.
        swap_directory(temp, target, target.parent / f"{_ASIDE_PREFIX}{target.name}-{_host()}-{os.getpid()}")
    else:
        try:
            os.rename(temp, target)
        except OSError as err:
            # Linux refuses to rename onto a non-empty directory: someone published it first.
            raise ExportError(
                f"cannot publish {target}: {err.strerror} (another export took this version?); "
                f"nothing was published; rerun to take the next free version"
            ) from err
    _fsync_path(target.parent)


def _host():
    return socket.gethostname().replace("/", "_")


def _recover_interrupted(base):
    """Cleans up after exports on this host that were killed: their pid is gone.

    `.tmp-*` directories are deleted. An `.old-<version>-*` directory (a kill during an
    overwrite, between its two renames) is put back if its version is missing.
    """
    suffix = f"-{_host()}"
    for path in base.iterdir():
        prefix = next((p for p in (_TEMP_PREFIX, _ASIDE_PREFIX) if path.name.startswith(p)), None)
        if prefix is None or not path.is_dir():
            continue
        head, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or not head.endswith(suffix) or _alive(int(pid)):
            continue
        version = head[len(prefix) : -len(suffix)]
        if prefix == _ASIDE_PREFIX and version.isdigit() and not (base / version).exists():
            os.rename(path, base / version)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
