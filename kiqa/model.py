"""The kiqa model: a `keras.applications` ConvNeXt backbone and a Dense MOS head.

`build_model(config)` returns a functional `keras.Model` with one input named
`image` (float pixels 0-255, any height and width, batch first) and one output
named `mos` of shape [batch] on KonIQ's 0-100 scale. The model returns the dict
`{"mos": tensor}`, so SavedModel signatures get stable names instead of
`output_0`.

Training targets are normalised to MOS/100 only inside the model and the loss:
the Dense head predicts MOS/100 (its bias starts at KonIQ's mean, 0.587) and a
`keras.layers.Rescaling(100.0)` maps it back, so the Keras file, the SavedModel
and every client see one 0-100 scale, while `mos_loss` keeps loss values on the
normalised scale (an MSE of 0.01 is an RMSE of 10 MOS points).

Compiling and fitting (checked with Keras 3.15 on this output layout):

    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss={"mos": mos_loss})
    model.fit(dataset)  # dataset yields (images [b, h, w, 3], {"mos": mos [b]})

`loss=mos_loss` and plain targets `mos [b]` (or `[b, 1]`) give the identical
loss: Keras matches a single-output dict model to a bare target and squeezes
`[b, 1]` to `[b]` before the loss sees it. With one output, Keras does not
prefix metric names: history keys are `loss`, `val_loss` and, for
`metrics={"mos": [keras.metrics.MeanAbsoluteError(name="mae")]}`, `mae`
(not `mos_mae`). Keep one target layout per compiled model: after calls with [b]
targets, a call with [b, 1] targets makes Keras retrace with an unknown-rank
spec and fail ("Cannot take the length of shape with unknown rank"), even with
`loss="mse"`. Feed images as a plain tensor, not `{"image": x}`: a one-input
functional model given a dict warns that the input structure does not match.
"""

import warnings
import zipfile
from pathlib import Path

import keras
from keras import ops

from kiqa.contract import MOS_OUTPUT as OUTPUT_NAME, MOS_SCALE, PIXELS_INPUT as INPUT_NAME
from kiqa.errors import LambdaLayerError, ModelError, ModelTooLargeError, WeightsError

# A model variant is data: one builder (`build_model`) reads this table.
CONVNEXT_VARIANTS = {
    "tiny": keras.applications.ConvNeXtTiny,
    "small": keras.applications.ConvNeXtSmall,
    "base": keras.applications.ConvNeXtBase,
    "large": keras.applications.ConvNeXtLarge,
    "xlarge": keras.applications.ConvNeXtXLarge,
}

# The small CNN: a plain ReLU CNN standing in for ConvNeXt where ImageNet weights are out
# of reach (offline teaching and tests). Always from random weights; it learns the demo
# task (held-out SRCC about 0.9) in CPU minutes, which ConvNeXt from scratch cannot. Two
# 3x3 convolutions per width, the second with stride 2. BatchNormalization momentum 0.9,
# not 0.99: with ~25 steps an epoch the default moving averages lag the weights by several
# epochs and evaluation looks untrained.
SMALL_CNN = "small-cnn"
SMALL_CNN_VARIANT = dict(widths=(16, 32, 48, 64), batch_norm_momentum=0.9)
BACKBONES = ("convnext", SMALL_CNN)

# Mean of the 0-100 MOS over all 10,073 KonIQ-10k images (58.73). The head's bias
# starts there, so the first steps fit image differences, not the offset.
KONIQ_MEAN_MOS = 58.73

# Stable layer names: the trainer freezes the backbone by name and the exporter
# reads the output by name.
BACKBONE_NAME = "backbone"


@keras.saving.register_keras_serializable(package="kiqa")
def mos_loss(y_true, y_pred):
    """Squared error on the normalised scale: ((y_true - y_pred) / 100) ** 2.

    Both arguments are on the 0-100 MOS scale. The loss returns one value per
    image; Keras averages them over the batch (honouring sample weights), so the
    reported loss is the mean squared error of MOS/100.

    Args:
        y_true: target MOS, shape [batch] (or [batch, 1]).
        y_pred: predicted MOS, shape [batch].

    Returns:
        Per-image squared normalised error, shape [batch].
    """
    y_pred = ops.convert_to_tensor(y_pred)
    # Reshape instead of relying on broadcasting: [b, 1] against [b] would
    # silently broadcast to [b, b] and train on every pair of images.
    y_true = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
    return ops.square((y_true - y_pred) / MOS_SCALE)


def custom_objects():
    """Returns the objects a kiqa `.keras` file needs to load (the losses, the distribution layer)."""
    from kiqa.distribution import RatingLoss, RatingMoments, emd_loss

    return {"mos_loss": mos_loss, "kiqa>mos_loss": mos_loss, "emd_loss": emd_loss, "kiqa>emd_loss": emd_loss,
            "RatingLoss": RatingLoss, "kiqa>RatingLoss": RatingLoss,
            "RatingMoments": RatingMoments, "kiqa>RatingMoments": RatingMoments}


def variant_display_name(variant):
    """Returns a readable name for a variant, e.g. "ConvNeXt-Tiny" for "tiny"."""
    return CONVNEXT_VARIANTS[variant].__name__.replace("ConvNeXt", "ConvNeXt-")


def small_cnn(widths=SMALL_CNN_VARIANT["widths"], batch_norm_momentum=SMALL_CNN_VARIANT["batch_norm_momentum"]):
    """The small CNN backbone: 0-255 pixels in, a feature map out (see `SMALL_CNN_VARIANT`).

    Args:
        widths: channels of each stage; each stage halves the resolution.
        batch_norm_momentum: momentum of the `keras.layers.BatchNormalization` layers.

    Returns:
        A functional `keras.Model` named "small_cnn", randomly initialised.
    """
    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    for width in widths:
        for strides in (1, 2):
            x = keras.layers.Conv2D(width, 3, strides=strides, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=batch_norm_momentum)(x)
            x = keras.layers.ReLU()(x)
    return keras.Model(image, x, name="small_cnn")


def build_backbone(variant="tiny", weights="imagenet", fast_depthwise=True):
    """Builds a headless ConvNeXt backbone mapping 0-255 pixels to a feature vector.

    The backbone is `include_top=False` with `pooling="avg"`: global average
    pooling, then ConvNeXt's final LayerNormalization, the order of ConvNeXt's
    own classification head (pool, LayerNorm, Dense). The pooling adds no
    weights, so keras' `_notop.h5` files load unchanged.

    Args:
        variant: a key of `CONVNEXT_VARIANTS` ("tiny" ... "xlarge").
        weights: "imagenet", "none", or a path to a Keras weights file of the
            same variant's backbone (a `.weights.h5` saved from
            `keras.applications.ConvNeXtTiny(include_top=False)` or keras'
            `convnext_tiny_notop.h5`).
        fast_depthwise: convert the grouped 7x7 convolutions to
            `keras.layers.DepthwiseConv2D` after the weights are loaded (see
            `fast_depthwise_backbone`).

    Returns:
        A functional `keras.Model` named "backbone": images [b, h, w, 3] in,
        features [b, channels] out.

    Raises:
        ModelError: unknown variant, ImageNet weights not downloadable, or a
            weights file that is missing or does not fit the variant.
    """
    if variant not in CONVNEXT_VARIANTS:
        raise ModelError(
            f"unknown ConvNeXt variant {variant!r}; choose one of {sorted(CONVNEXT_VARIANTS)}"
        )
    constructor = CONVNEXT_VARIANTS[variant]
    name = variant_display_name(variant)
    kwargs = dict(
        include_top=False,
        include_preprocessing=True,  # ImageNet mean/std normalisation of 0-255 pixels
        input_shape=(None, None, 3),
        pooling="avg",
    )
    weights = "none" if weights is None else str(weights)
    if weights == "imagenet":
        try:
            backbone = constructor(weights="imagenet", **kwargs)
        except Exception as err:  # keras.utils.get_file raises a bare Exception offline
            facts = f"could not download the ImageNet weights for {name} ({_reason(err)})"
            raise WeightsError(
                f"{facts}; pass weights= a local Keras weights file of the backbone (e.g. "
                f"convnext_{variant}_notop.h5 from Keras' storage), or weights='none' for random "
                f"initial weights (which learn next to nothing on small data)",
                variant, "imagenet", "download", facts=facts,
            ) from err
    elif weights == "none":
        backbone = constructor(weights=None, **kwargs)
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} not found (wanted for the {name} backbone)", variant, str(path), "missing",
            )
        backbone = constructor(weights=None, **kwargs)
        _load_backbone_weights(backbone, path, variant)
    if fast_depthwise:
        # After loading: keras' weight files describe the stock grouped Conv2D layers.
        backbone = fast_depthwise_backbone(backbone)
    return _named_backbone(backbone)


def _load_backbone_weights(backbone, path, variant):
    name = variant_display_name(variant)
    # Keras reports some partial loads only as warnings (and leaves those layers
    # at their random init); a half-loaded backbone must not train silently.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(str(path))
        except Exception as err:
            raise WeightsError(_mismatch_message(path, name, variant, _reason(err)), variant, str(path),
                               "mismatch") from err
    partial = [
        str(w.message) for w in caught
        if any(key in str(w.message).lower() for key in ("skipping", "could not be loaded", "mismatch"))
    ]
    if partial:
        raise WeightsError(_mismatch_message(path, name, variant, _reason(partial[0])), variant, str(path),
                           "mismatch")


def _mismatch_message(path, name, variant, reason):
    return (
        f"weights file {path} does not fit the {name} backbone ({reason}); what fits is a "
        f"`.weights.h5` saved from keras.applications.{CONVNEXT_VARIANTS[variant].__name__}"
        f"(include_top=False) or keras' convnext_{variant}_notop.h5, or the variant the file "
        f"was saved from"
    )


def _reason(err, limit=300):
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_depthwise_conv2d(layer):
    """True for a `Conv2D` with one input channel per group and one filter per group."""
    if type(layer) is not keras.layers.Conv2D or layer.groups <= 1 or not layer.built:
        return False
    kernel_in = layer.kernel.shape[2]  # grouped kernel: (kh, kw, in_channels / groups, filters)
    return kernel_in == 1 and layer.filters == layer.groups


def fast_depthwise_backbone(backbone):
    """Returns a copy of `backbone` with depthwise grouped `Conv2D`s as `DepthwiseConv2D`.

    Keras 3's ConvNeXt builds its 7x7 depthwise convolutions as
    `keras.layers.Conv2D(groups=C)`. On CPU the TF backend runs a grouped
    convolution inside a nested `jit_compile=True` function that XLA executes at
    about 0.8 GFLOP/s; `keras.layers.DepthwiseConv2D` runs
    `tf.nn.depthwise_conv2d`. Measured on a 2-core CPU, ConvNeXt-Tiny forward:
    88 -> 18 ms at 2x64x64, 1170 -> 232 ms at 1x384x512 (about 5x), same
    parameter count, outputs within 5e-7. The JAX backend runs both through
    `lax.conv_general_dilated`, and the depthwise form is faster there too
    (1x384x512: 4.7 -> 3.0 s, jax 0.10 on the same shared CPU), so it is the
    default on both backends. The copy uses only core layers, so it saves and
    loads as `.keras` with `safe_mode=True` under either backend.

    Apply it after loading weights: keras' weight files describe the stock layers.

    Args:
        backbone: a functional or sequential `keras.Model` (e.g. a
            `keras.applications.ConvNeXtTiny`); nested models are converted too.

    Returns:
        A new `keras.Model` with the same name, layer names and weights. Every
        `Conv2D` whose groups == input channels == filters is a
        `DepthwiseConv2D` (kernel (kh, kw, 1, C) stored as (kh, kw, C, 1)).

    Raises:
        ModelError: the backbone is not a functional or sequential model.
    """
    def clone_layer(layer):
        if not _is_depthwise_conv2d(layer):
            return layer.__class__.from_config(layer.get_config())
        return keras.layers.DepthwiseConv2D(
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            depth_multiplier=1,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
            activation=layer.activation,
            use_bias=layer.use_bias,
            depthwise_regularizer=layer.kernel_regularizer,
            bias_regularizer=layer.bias_regularizer,
            activity_regularizer=layer.activity_regularizer,
            depthwise_constraint=layer.kernel_constraint,
            bias_constraint=layer.bias_constraint,
            dtype=layer.dtype_policy,
            trainable=layer.trainable,
            name=layer.name,
        )

    try:
        fast = keras.models.clone_model(backbone, clone_function=clone_layer, recursive=True)
    except ValueError as err:
        raise ModelError(
            f"cannot convert backbone {backbone.name!r} to DepthwiseConv2D: {err}; "
            f"pass a functional or sequential keras.Model, or set fast_depthwise=False"
        ) from err
    _copy_weights(backbone, fast)
    return fast


def _copy_weights(source, target):
    """Copies weights layer by layer (matched by name), reshaping grouped kernels."""
    for new in target.layers:
        if isinstance(new, keras.layers.InputLayer):
            continue  # no weights; clone_model gives the new inputs new names
        old = source.get_layer(new.name)
        if isinstance(new, keras.layers.DepthwiseConv2D) and _is_depthwise_conv2d(old):
            kernel = ops.convert_to_numpy(old.kernel)
            new.kernel.assign(kernel.reshape(kernel.shape[:2] + (kernel.shape[3], 1)))
            if old.use_bias:
                new.bias.assign(ops.convert_to_numpy(old.bias))
        elif isinstance(new, keras.Model) and new.layers:
            _copy_weights(old, new)
        else:
            new.set_weights(old.get_weights())


def _named_backbone(backbone):
    """Gives the backbone the stable name "backbone" without nesting it again."""
    if backbone.name == BACKBONE_NAME:
        return backbone
    try:
        inputs, outputs = backbone.inputs, backbone.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and len(inputs) == 1 and len(outputs) == 1:
        # A new functional model over the same layers and weights, renamed.
        return keras.Model(inputs[0], outputs[0], name=BACKBONE_NAME)
    # Subclassed model: wrap it once in a functional model.
    image = keras.Input(shape=(None, None, 3), name=INPUT_NAME)
    return keras.Model(image, backbone(image), name=BACKBONE_NAME)


def build_model(config, backbone=None):
    """Builds the MOS model for a training configuration.

    Layout: image (0-255) -> backbone -> global average pooling (if the backbone
    returns a feature map) -> optional `keras.layers.Dropout(config.dropout)`
    -> `keras.layers.Dense(1)` predicting MOS/100 (bias initialised at KonIQ's
    mean, 0.587; kernel at std 0.001, so first predictions sit within a few
    points of the mean) -> `keras.layers.Rescaling(100.0)` -> reshape to [batch],
    output named "mos". The head computes in float32, so under a
    `mixed_float16` global policy (set by the trainer, not here) the output is
    still float32.

    Args:
        config: a `kiqa.config.TrainConfig`; reads `backbone`, `variant`,
            `weights`, `fast_depthwise` and `dropout`.
        backbone: optional `keras.Model` mapping images [b, h, w, 3] (0-255
            floats) to a feature map [b, h', w', c] or a feature vector [b, c].
            It is used as given (no weights loading, no conversion); tests pass
            a small CNN. None builds what the config names: ConvNeXt
            `config.variant` with `config.weights`, or the small CNN (random init).

    With `config.head == "distribution"` the head is `kiqa.distribution.distribution_head`
    instead: Dense(5) + softmax gives the output "dist" [batch, 5] (shares of the five
    rating levels), and "mos" and "mos_sd" ([batch], 0-100) are derived from it.

    Returns:
        An uncompiled functional `keras.Model`: input "image"
        [batch, None, None, 3] float32, output dict `{"mos": [batch]}` float32
        on the 0-100 scale (plus "mos_sd" and "dist" for the distribution head).
        Compile with `loss={"mos": mos_loss}`.

    Raises:
        ModelError: the ConvNeXt cannot get its weights, or the backbone's
            output is neither a feature map nor a feature vector.
    """
    if backbone is None and config.backbone == SMALL_CNN:
        backbone = _named_backbone(small_cnn())
        model_name = "kiqa_small_cnn"
    elif backbone is None:
        backbone = build_backbone(config.variant, config.weights, config.fast_depthwise)
        model_name = f"kiqa_convnext_{config.variant}"
    else:
        backbone = _named_backbone(backbone)
        model_name = "kiqa_custom"

    image = keras.Input(shape=(None, None, 3), name=INPUT_NAME)
    features = backbone(image)
    # The head runs in float32: under mixed_float16 the 0-100 output and the loss
    # keep full precision (float16 has ~3 significant digits).
    head_dtype = "float32"
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(dtype=head_dtype, name="pool")(features)
    elif len(features.shape) != 2:
        raise ModelError(
            f"backbone {backbone.name!r} returns shape {features.shape}; expected a feature map "
            f"[batch, height, width, channels] or a feature vector [batch, channels]"
        )
    if config.dropout > 0:
        features = keras.layers.Dropout(config.dropout, dtype=head_dtype, name="head_dropout")(features)
    if getattr(config, "head", "regression") == "distribution":
        from kiqa.distribution import distribution_head

        return keras.Model(image, distribution_head(features, head_dtype), name=model_name)
    normalised = keras.layers.Dense(
        1,
        # Small weights: glorot on 768 LayerNorm'd features would start predictions
        # +-100 MOS points from the mean; std 0.001 starts them within a few points.
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        bias_initializer=keras.initializers.Constant(KONIQ_MEAN_MOS / MOS_SCALE),
        dtype=head_dtype,
        name="head_dense",
    )(features)
    scaled = keras.layers.Rescaling(MOS_SCALE, dtype=head_dtype, name="to_mos_scale")(normalised)
    # Reshape to [batch] (not [batch, 1]): the SavedModel signature promises mos: float[-1].
    mos = keras.layers.Reshape((), dtype=head_dtype, name=OUTPUT_NAME)(scaled)
    return keras.Model(image, {OUTPUT_NAME: mos}, name=model_name)


def set_backbone_trainable(model, trainable):
    """Freezes or unfreezes the backbone (head-only warm-up epochs).

    Recompile the model afterwards: `model.fit` uses the trainable state that
    was current when `compile` ran.

    Args:
        model: a model from `build_model` (it has a layer named "backbone").
        trainable: True to fine-tune the backbone, False to train the head only.

    Raises:
        ModelError: the model has no layer named "backbone".
    """
    try:
        backbone = model.get_layer(BACKBONE_NAME)
    except ValueError as err:
        raise ModelError(
            f"model {model.name!r} has no layer named {BACKBONE_NAME!r}; build it with "
            f"kiqa.model.build_model"
        ) from err
    backbone.trainable = bool(trainable)


# A .keras file is a zip (config.json, metadata.json, model.weights.h5) that Keras inflates
# into memory: a small file of compressed zeros can inflate to gigabytes (3 GB killed
# `kiqa score` by memory, issue 24). Its entries' sizes are checked before Keras reads it.
# ConvNeXt-XLarge's ~350M float32 weights are 1.4 GB, under the bound.
MAX_KERAS_INFLATED_BYTES = 2 * 1024**3
# Float weights barely compress (a few percent); a zip bomb of zeros inflates ~1000x. An
# entry of more than _RATIO_FLOOR bytes may inflate at most this many times its stored size.
MAX_KERAS_COMPRESSION_RATIO = 20
_RATIO_FLOOR = 64 * 1024**2


def check_keras_archive(path, max_inflated=None):
    """Refuses a `.keras` archive whose entries would inflate past kiqa's bounds.

    Only the zip's central directory is read; Python's zipfile never inflates an entry
    past the size recorded there, so the recorded sizes bound what loading can inflate.

    Args:
        path: the `.keras` file.
        max_inflated: largest total inflated size, in bytes (None: MAX_KERAS_INFLATED_BYTES).

    Raises:
        ModelTooLargeError: (a ModelError) the entries inflate to more than
            `max_inflated` bytes in all, or one large entry to more than
            MAX_KERAS_COMPRESSION_RATIO times its stored size.
    """
    max_inflated = MAX_KERAS_INFLATED_BYTES if max_inflated is None else max_inflated
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: Keras says why when it tries to load it
    total = sum(entry.file_size for entry in entries)
    if total > max_inflated:
        raise ModelTooLargeError(
            f"model file {path} would inflate to {total} bytes when loaded, over kiqa's bound of "
            f"{max_inflated} bytes (ConvNeXt-XLarge's weights are 1.4 GB); it is not a kiqa model",
            path=str(path), inflated=total, limit=max_inflated,
        )
    for entry in entries:
        stored = max(entry.compress_size, 1)
        if entry.file_size > _RATIO_FLOOR and entry.file_size > MAX_KERAS_COMPRESSION_RATIO * stored:
            raise ModelTooLargeError(
                f"model file {path}: its entry {entry.filename!r} inflates from {entry.compress_size} "
                f"to {entry.file_size} bytes, over {MAX_KERAS_COMPRESSION_RATIO}x (model weights "
                f"barely compress): a zip bomb, not a kiqa model",
                path=str(path), inflated=entry.file_size, limit=MAX_KERAS_COMPRESSION_RATIO * stored,
            )


def load_model(path, safe_mode=True):
    """Loads a `.keras` model file saved by kiqa.

    Args:
        path: the `.keras` file.
        safe_mode: refuse files with `keras.layers.Lambda` (arbitrary code).
            kiqa models contain none; only turn it off for files you trust.

    Returns:
        The `keras.Model`, compiled if it was saved compiled.

    Raises:
        ModelError: missing file, or not a Keras `.keras` file.
        LambdaLayerError: a Lambda layer refused by safe mode.
        ModelTooLargeError: (a ModelError) the archive would inflate past kiqa's bounds
            (`check_keras_archive`).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} not found; pass the .keras file a training run saved")
    if path.suffix != ".keras":
        raise ModelError(
            f"model file {path} is not a .keras file; pass the .keras file a training run "
            f"saved (SavedModel directories are for TF Serving, not for loading here)"
        )
    check_keras_archive(path)
    try:
        return keras.saving.load_model(path, custom_objects=custom_objects(), safe_mode=safe_mode)
    except Exception as err:
        reason = _reason(err)
        if safe_mode and "safe_mode" in str(err):
            raise LambdaLayerError(
                f"model file {path} contains a Lambda layer (arbitrary Python code), which "
                f"safe mode refuses; load it with safe_mode=False only if you trust where the file came from",
                path=str(path),
            ) from err
        raise ModelError(f"cannot load model file {path}: {reason}") from err
