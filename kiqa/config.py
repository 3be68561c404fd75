"""One typed configuration for a training run.

The defaults are the real KonIQ-10k run (ConvNeXt-Tiny from ImageNet weights, whole
image at 384x512, official split). `TrainConfig.demo()` is the small variant that
trains on the built-in demo data in minutes on a laptop CPU. The resolved config is
written beside the checkpoints as `config.json`, so every run can be repeated.
"""

import dataclasses
import json
import math
import numbers
import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from kiqa.contract import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_PIXELS, HEADS
from kiqa.errors import ConfigError

VARIANTS = ("tiny", "small", "base", "large", "xlarge")
# "small-cnn" is a teaching and testing backbone (kiqa.model.small_cnn), never a default.
BACKBONES = ("convnext", "small-cnn")
SPLITS = ("official", "random", "repeated")
MONITORS = ("val_loss", "val_srcc", "val_plcc")
CACHES = ("none", "memory")  # or a directory path for tf.data's file cache
ON_BAD_IMAGES = ("drop", "stop")
# The TF strategies and data-parallel (JAX backend); kiqa.distribute says which backend runs which.
STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker", "data-parallel")

# The small CNN's demo recipe: from random weights it needs more epochs and a higher
# learning rate than a fine-tuned ConvNeXt, and 48x64 is enough for the demo distortions
# (and 4x cheaper). Measured on the built-in demo data (2-core CPU, ~5 min): held-out
# SRCC 0.80 with --seed 1; with lr 1e-3 it stayed below 0.3 (docs/training.md, "Offline").
# Sane upper bounds, checked before anything runs: past them a run hangs for days, or the
# first batch is killed by memory with no message. Generous for a real GPU run.
MAX_EPOCHS = 10_000  # also warmup_epochs and patience
MAX_REPEATS = 1_000
MAX_BATCH_SIZE = 4_096
MAX_IMAGE_SIDE = 4_096  # pixels per side of image_size (KonIQ's photos are 1024x768)
# batch_size x height x width: 32 images at 1024x1024 or 128 at 512x512 (ConvNeXt-Tiny's
# training activations are ~1 GB per megapixel, so this already needs a large GPU; the
# default 16 at 384x512 is 3 M). 20000x20000 at batch 1 (400 M pixels) is far over it.
MAX_BATCH_PIXELS = 32 * 1024 * 1024
MAX_HEADER_PIXELS = 1_000_000_000  # max_pixels: a 1-gigapixel image decodes to 3 GB of RGB
MAX_SEED = 2**32 - 1  # numpy's and TF's seeds are 32-bit
MAX_LEARNING_RATE = 10.0

SMALL_CNN_DEMO = dict(weights="none", image_size=(48, 64), epochs=24, patience=24, batch_size=16,
                      learning_rate=2e-3)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        labels: KonIQ-format label CSV, or any labelled CSV when `path_column` is set.
            None trains on the built-in demo data.
        images: folder the CSV's `image_name` values are relative to. None means the
            CSV's own folder, or its `1024x768/` or `512x384/` subfolder if present.
        path_column: column of image paths of a plain labelled CSV (`kiqa.data.labelled`);
            None reads `labels` as a KonIQ file. A plain CSV's own `set` column
            (training / validation / test) is its official split; without one, use a
            random or repeated split.
        mos_column: column of scores of a plain labelled CSV.
        scale: range of those scores ("1-5", "0-1", "0-100" or "LOW-HIGH"), mapped
            linearly to 0-100 as `kiqa evaluate` maps it.
        split: "official" (KonIQ's `set` column: 7058/1000/2015), "random" (one seeded
            train/test split) or "repeated" (`repeats` seeded splits, the literature's
            protocol, reported as median and spread).
        test_fraction: share of images held out for testing in random splits
            (0.2 is the literature's 80/20; the KonIQ paper used 0.3).
        val_fraction: share of the training part carved out (seeded) for early
            stopping when the split has no validation part.
        repeats: number of seeded splits for split="repeated".
        seed: seeds the splits, the shuffle, the augmentation and the weights init.
        on_bad_images: "drop" rejected images (listed in rejects.csv) or "stop".
        max_bad_fraction: stop anyway if more than this share of images is bad.
        max_pixels: header pixel cap; larger images are rejected before decoding.
        image_size: (height, width) every image is resized to (antialiased, whole
            image, no crop). KonIQ's photos are 4:3, so 384x512 keeps their aspect.
        hflip: random horizontal flips in training (quality-preserving).
        train_crop: (height, width) of a random crop, without rescaling, taken from
            each resized training image; None trains on whole images. Evaluation
            always sees whole images (the model is fully convolutional).
        prepared: folder of a set made by `kiqa prepare` to read the training images
            from. None uses `<labels folder>/prepared-<H>x<W>/` when it exists and
            matches; a folder given here must match, or training stops with the reason.
        cache: "none", "memory" (decoded, resized uint8 images) or a directory for
            tf.data's file cache.
        backbone: "convnext" (the real model) or "small-cnn", a plain ReLU CNN from
            random weights for offline teaching and testing: it learns the demo task
            in CPU minutes, but its scores are never meaningful quality predictions.
        variant: ConvNeXt size: tiny, small, base, large or xlarge.
        weights: "imagenet", "none" or a path to a Keras weights file of the backbone.
        fast_depthwise: run ConvNeXt's 7x7 depthwise convolutions as DepthwiseConv2D
            (4-5x faster on CPU, same weights and outputs).
        dropout: dropout rate before the regression head.
        head: "regression" (one Dense unit: the MOS) or "distribution" (the shares of
            the five rating levels, from which the model derives `mos` and `mos_sd`;
            needs label files with c1..c5, see `kiqa.distribution`).
        mos_loss_weight: distribution head only: weight of the MSE on MOS/100 added to
            the squared EMD of the distributions, so the MOS stays as good as the
            regression head's.
        sd_loss_weight: distribution head only: weight of the squared error of the spread
            (`mos_sd`/100, as the MOS term) added to the squared EMD, so the spread is
            trained as directly as the MOS (`kiqa.distribution.RatingLoss` says why). 30:
            people's spread varies far less than the MOS (its variance is 1/71 of the MOS's
            on KonIQ, 1/19 on the demo data), so at 30 the two terms start at the same order
            of size; on the demo data's held-out photos 30 ranked the spread best of 1, 3,
            10 and 30 in every fold, with the MOS no worse (docs/uncertainty.md).
        warmup_epochs: head-only epochs with the backbone frozen before fine-tuning.
        epochs: maximum fine-tuning epochs (early stopping usually ends sooner).
        batch_size: global batch size.
        learning_rate: Adam learning rate.
        epsilon: Adam epsilon.
        patience: early-stopping patience in epochs; best weights are restored.
        monitor: "val_loss", "val_srcc" or "val_plcc" for early stopping and the
            best checkpoint.
        mixed_precision: mixed_float16 compute (a GPU switch; runs but does not help
            on CPU).
        jit_compile: XLA-compile the train step (a GPU switch).
        strategy: auto, one-device, mirrored, multi-worker (TensorFlow backend) or
            data-parallel (JAX backend; see kiqa.distribute).
        run_dir: where checkpoints, logs, metrics and plots go. None means
            `runs/<name>`; rerunning the same command resumes there.
        name: run name used for the default run_dir.
    """

    labels: Optional[str] = None
    images: Optional[str] = None
    path_column: Optional[str] = None
    mos_column: Optional[str] = None
    scale: Optional[str] = None
    split: str = "official"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    repeats: int = 1
    seed: int = 0
    on_bad_images: str = "drop"
    max_bad_fraction: float = 0.01
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE
    hflip: bool = True
    train_crop: Optional[Tuple[int, int]] = None
    prepared: Optional[str] = None
    cache: str = "none"
    backbone: str = "convnext"
    variant: str = "tiny"
    weights: str = "imagenet"
    fast_depthwise: bool = True
    dropout: float = 0.0
    head: str = "regression"
    mos_loss_weight: float = 1.0
    sd_loss_weight: float = 30.0
    warmup_epochs: int = 0
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 1e-4
    epsilon: float = 1e-7
    patience: int = 5
    monitor: str = "val_srcc"
    mixed_precision: bool = False
    jit_compile: bool = False
    strategy: str = "auto"
    run_dir: Optional[str] = None
    name: str = "koniq"

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.train_crop is not None:
            object.__setattr__(self, "train_crop", tuple(int(v) for v in self.train_crop))
        self.validate()

    @classmethod
    def demo(cls, **overrides: Any) -> "TrainConfig":
        """The small variant: built-in demo data, 96x128 images, a few epochs.

        Args:
            **overrides: fields to change, e.g. `weights="none"`.

        Returns:
            A `TrainConfig`.

        Raises:
            ConfigError: an override names no field or has an invalid value.
        """
        fields: Dict[str, Any] = dict(
            labels=None,
            split="random",
            test_fraction=0.25,
            val_fraction=0.15,
            image_size=(96, 128),
            cache="memory",
            epochs=4,
            batch_size=16,
            learning_rate=2e-4,
            patience=3,
            name="demo",
        )
        if overrides.get("backbone") == "small-cnn":
            fields.update(SMALL_CNN_DEMO)
        fields.update(overrides)
        return cls(**fields)

    def validate(self) -> None:
        """Checks every field.

        Raises:
            ConfigError: a field has an invalid value; the message names the field and
                the choices.
        """
        _choice("split", self.split, SPLITS)
        self._validate_label_columns()
        _choice("backbone", self.backbone, BACKBONES)
        _choice("variant", self.variant, VARIANTS)
        if self.backbone == "small-cnn" and self.weights != "none":
            raise ConfigError(
                f"backbone 'small-cnn' has no pretrained weights (it always starts from random "
                f"weights); weights must be 'none', got {self.weights!r}"
            )
        _choice("monitor", self.monitor, MONITORS)
        _choice("head", self.head, HEADS)
        if not self.mos_loss_weight >= 0:
            raise ConfigError(f"mos_loss_weight must be 0 or more, got {self.mos_loss_weight}")
        if not self.sd_loss_weight >= 0:
            raise ConfigError(f"sd_loss_weight must be 0 or more, got {self.sd_loss_weight}")
        _choice("on_bad_images", self.on_bad_images, ON_BAD_IMAGES)
        _choice("strategy", self.strategy, STRATEGIES)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ConfigError(
                f"image_size must be (height, width) of at least 32 pixels each, got {self.image_size}"
            )
        if self.train_crop is not None and (
            len(self.train_crop) != 2
            or not all(16 <= c <= s for c, s in zip(self.train_crop, self.image_size))
        ):
            raise ConfigError(
                f"train_crop must be (height, width) within image_size {self.image_size}, got {self.train_crop}"
            )
        for field, low, high in (("repeats", 1, MAX_REPEATS), ("epochs", 1, MAX_EPOCHS),
                                 ("batch_size", 1, MAX_BATCH_SIZE), ("patience", 1, MAX_EPOCHS),
                                 ("max_pixels", 1, MAX_HEADER_PIXELS), ("warmup_epochs", 0, MAX_EPOCHS),
                                 ("seed", 0, MAX_SEED)):
            if not low <= getattr(self, field) <= high:
                raise ConfigError(f"{field} must be between {low} and {high:,}, got {getattr(self, field):,}")
        if max(self.image_size) > MAX_IMAGE_SIDE:
            raise ConfigError(f"image_size must be at most {MAX_IMAGE_SIDE} pixels a side, got "
                              f"{list(self.image_size)}; KonIQ's photos are 768x1024 (the default trains at 384x512)")
        batch_pixels = self.batch_size * self.image_size[0] * self.image_size[1]
        if batch_pixels > MAX_BATCH_PIXELS:
            raise ConfigError(
                f"batch_size x image_size is {self.batch_size} x {self.image_size[0]}x{self.image_size[1]} = "
                f"{batch_pixels:,} pixels a batch, over kiqa's limit of {MAX_BATCH_PIXELS:,} (beyond it a batch "
                f"does not fit in memory); "
                f"lower batch_size or image_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for field in ("learning_rate", "epsilon"):
            if not 0.0 < getattr(self, field) <= MAX_LEARNING_RATE:
                raise ConfigError(f"{field} must be a positive finite number up to {MAX_LEARNING_RATE:g}, "
                                  f"got {getattr(self, field)} (e.g. 1e-4)")
        if self.split == "repeated" and self.repeats < 2:
            raise ConfigError("split='repeated' needs repeats >= 2 (e.g. 10)")

    def _validate_label_columns(self) -> None:
        """A plain labelled CSV's columns and scale: all three given, with `labels`."""
        plain = {"path_column": self.path_column, "mos_column": self.mos_column, "scale": self.scale}
        if not any(value is not None for value in plain.values()):
            return
        missing = sorted(key for key, value in plain.items() if value is None)
        if missing:
            raise ConfigError(f"a plain labelled CSV needs path_column, mos_column and scale together; "
                              f"{missing} not given")
        if not self.labels:
            raise ConfigError("path_column, mos_column and scale describe a label file: set labels too")
        if not self.path_column or not self.mos_column:
            raise ConfigError("path_column and mos_column must name columns, got an empty string")
        from kiqa.data.labelled import parse_scale

        parse_scale(self.scale)  # raises ConfigError naming the bad range

    @property
    def resolved_run_dir(self) -> Path:
        """The run directory as a `Path`: `run_dir`, or `runs/<name>`."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed.

        Args:
            **changes: field names and their new values.

        Returns:
            The new, validated `TrainConfig`.

        Raises:
            ConfigError: a changed value is invalid.
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The config as a JSON-ready dict.

        Returns:
            {field: value}, tuples as lists.
        """
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["train_crop"] = list(self.train_crop) if self.train_crop else None
        return data

    def changed_keys(self, other: "TrainConfig") -> List[str]:
        """The fields whose values differ between two configs.

        Args:
            other: the config to compare with.

        Returns:
            Their names, sorted.
        """
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(key for key, value in mine.items() if theirs.get(key) != value)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the config as JSON, atomically (a kill leaves the old file or the new one).

        Args:
            path: the file to write (usually `<run_dir>/config.json`).
        """
        from kiqa.fsutil import write_text_atomically

        write_text_atomically(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Builds a config from a dict, rejecting unknown keys by name.

        Args:
            data: mapping of field names to values.
            source: where the data came from, for error messages.

        Returns:
            The validated `TrainConfig`.

        Raises:
            ConfigError: on unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TrainConfig":
        """Reads a JSON config file written by `save` or by hand.

        Args:
            path: the JSON file.

        Returns:
            The validated `TrainConfig`.

        Raises:
            ConfigError: the file is unreadable, not a JSON object, or holds unknown
                keys or invalid values.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
        except RecursionError as err:
            raise ConfigError(f"config file {path} nests too deeply to be a config; every value is a "
                              f"string, number, true/false, null or a [height, width] pair") from err
        except ValueError as err:  # NaN / Infinity
            raise ConfigError(f"config file {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of fields")
        return cls.from_dict(data, source=str(path))


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number a config can hold (NaN or Infinity); give a finite value")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_size(value):
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)


# What each annotated type accepts, and how to say it: checked before any value is used,
# so a string for an int or a list for a path is named instead of failing deep in TF.
_TYPE_RULES = {
    str: (lambda v: isinstance(v, str), 'a string, e.g. "official"'),
    Optional[str]: (lambda v: v is None or isinstance(v, str), "a string or null"),
    int: (_is_int, "a whole number, e.g. 10 (not 10.0 or \"10\")"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
            "a finite number, e.g. 0.0001"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    Tuple[int, int]: (_is_size, "[height, width] in whole pixels, e.g. [384, 512]"),
    Optional[Tuple[int, int]]: (lambda v: v is None or _is_size(v), "[height, width] in whole pixels, or null"),
}


def _check_types(config):
    """Raises `ConfigError` naming the first field whose value has the wrong type."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        accepts, wanted = _TYPE_RULES[hints[field.name]]
        if not accepts(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConfigError(f"{field.name} must be {wanted}, got {shown} ({type(value).__name__})")


def _choice(field, value, choices):
    if value not in choices:
        raise ConfigError(f"{field} must be one of {list(choices)}, got {value!r}")
