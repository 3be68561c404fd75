"""Prepared datasets: every image decoded and resized once, kept as 8-bit TFRecord shards.

Training at 384x512 on KonIQ decodes and resizes 7,058 JPEGs of 1024x768 every epoch;
on a CPU-bound input pipeline that is most of an epoch's input time. `prepare_dataset`
does that work once, with the same `kiqa.image.decode_image` training uses, and stores the
result as uint8 pixels. The store is exact, not an approximation: `decode_image` rounds
to the 8-bit grid, so the float32 images read back equal the ones decoded from the files.

Layout of a prepared folder (default `<labels folder>/prepared-<H>x<W>/`, see
`default_prepared_dir`, where the trainer finds it without being told):

    manifest.json          image size, max_pixels, versions, label file + sha256,
                           one entry per image (name, mos, shard, file size and mtime),
                           rejects (name, path, reason)
    shard-00000.tfrecord   tf.train.Example records in label-file order:
    ...                    image (H*W*3 uint8 bytes), image_name, mos, record, height, width

Disk cost is H*W*3 bytes per image, uncompressed on purpose (reading must cost less
than decoding): 590 KB at 384x512, so 5.9 GB for KonIQ-10k's 10,073 images.

`open_prepared` refuses (returns None and says why) a folder prepared at another image
size or pixel cap, or whose source files changed since; `Prepared.dataset` then yields
the same elements, with the same shuffling, flips and batching, as
`kiqa.data.pipeline.make_dataset` with a cache (the prepared set *is* a persistent cache).
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from kiqa import __version__
from kiqa.data.pipeline import AUTOTUNE, finish_dataset, shuffled_epochs
from kiqa.data.validate import REJECT_COLUMNS, find_bad_images
from kiqa.errors import ConfigError, DataError
from kiqa.fsutil import publish_directory, sha256_of, staged_directory
from kiqa.image import DECODE_VERSION, file_decoder

logger = logging.getLogger(__name__)

FORMAT = "kiqa-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# TF's input-pipeline guide suggests shards of 100 MB or more for sequential reads; 256 MB
# gives KonIQ at 384x512 23 shards, enough for file-based sharding across workers.
TARGET_SHARD_BYTES = 256 * 1024 * 1024
READ_BUFFER_BYTES = 8 * 1024 * 1024
# Source files whose changes are named one by one in the refusal message.
_LISTED = 5


def default_prepared_dir(labels_path, image_size):
    """Where a label file's prepared set lives by default: `<its folder>/prepared-<H>x<W>/`.

    Args:
        labels_path: the KonIQ-format label CSV.
        image_size: (height, width).

    Returns:
        A `Path` (which may not exist).
    """
    height, width = (int(v) for v in image_size)
    return Path(labels_path).resolve().parent / f"prepared-{height}x{width}"


# Bytes read from the start of each file to find its header: a JPEG's frame header
# follows the EXIF segment, which is at most 64 KB.
_HEADER_BYTES = 1 << 17


class UpscaleWarning(UserWarning):
    """`prepare_dataset` enlarges images: the prepared set costs more disk than the sources.

    Attributes:
        sizes: {(height, width): count} of the source images smaller than the target.
        total: images prepared.
        image_size: the target (height, width).
        disk_bytes: the prepared set's pixel bytes (total * height * width * 3).
    """

    def __init__(self, sizes, total, image_size):
        self.sizes, self.total, self.image_size = dict(sizes), total, tuple(image_size)
        self.disk_bytes = total * self.image_size[0] * self.image_size[1] * 3
        common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(self.sizes.items(), key=lambda kv: -kv[1])[:3])
        super().__init__(
            f"{sum(self.sizes.values())} of {total} images are smaller than {self.image_size[0]}x"
            f"{self.image_size[1]} (source sizes: {common}) and are upscaled when prepared: the prepared "
            f"set takes {self.disk_bytes / 1e6:.0f} MB on disk and holds no more detail than the sources"
        )


def find_upscaled(paths, image_size):
    """Source sizes of the images a resize to `image_size` would enlarge, from their headers.

    Args:
        paths: image files.
        image_size: target (height, width).

    Returns:
        {(height, width): count} of the images smaller than the target in either side
        (images whose header size cannot be read are left out).
    """
    from kiqa.image.header import header_shape

    sizes = {}
    for path in paths:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
        height, width = (int(v) for v in header_shape(tf.constant(head)).numpy())
        if height > 0 and (height < image_size[0] or width < image_size[1]):
            sizes[(height, width)] = sizes.get((height, width), 0) + 1
    return sizes


def prepare_dataset(frame, root, config, out_dir, shards=None, progress=True):
    """Decodes and resizes every image once into uint8 TFRecord shards plus a manifest.

    Every image is first checked with `kiqa.data.validate.find_bad_images` (name,
    file, header pixel cap, full decode); bad ones are listed in the manifest's
    `rejects` and skipped, never fatal. The folder is written under a temporary name
    beside `out_dir` and renamed into place when complete, so an interrupted run
    leaves either the previous prepared set or none, never half of one.

    Args:
        frame: label table from `kiqa.data.koniq.read_labels` (image_name, mos; its
            `attrs["path"]` names the label file recorded in the manifest).
        root: image folder the names are relative to.
        config: `TrainConfig` (image_size, max_pixels).
        out_dir: the prepared folder to create or replace.
        shards: number of TFRecord shards; None picks ~256 MB per shard.
        progress: show progress bars.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ConfigError: `shards` is below 1.
        DataError: `out_dir` exists and is not a prepared set (it is never deleted),
            or no image at all can be used (the first reasons are listed).
    """
    out_dir = Path(out_dir)
    if shards is not None and shards < 1:
        raise ConfigError(f"shards must be at least 1, got {shards}")
    _check_replaceable(out_dir)
    paths, rejects = find_bad_images(frame, root, config, progress=progress)
    good = [row for row, path in enumerate(paths) if path is not None]
    if not good:
        listing = "\n".join(f"  {r.image_name}: {r.reason}" for r in rejects.head(10).itertuples())
        raise DataError(f"none of the {len(frame)} images in {root} can be used:\n{listing}")
    height, width = config.image_size
    upscaled = find_upscaled([paths[row] for row in good], config.image_size)
    if upscaled:
        warnings.warn(UpscaleWarning(upscaled, len(good), config.image_size), stacklevel=2)
    if shards is None:
        shards = math.ceil(len(good) * height * width * 3 / TARGET_SHARD_BYTES)
    shards = max(1, min(shards, len(good)))

    with staged_directory(out_dir) as staging:
        shard_list, images, late = _write_shards(staging, frame, paths, good, config, shards, progress)
        rejects = pd.concat([rejects, pd.DataFrame(late, columns=REJECT_COLUMNS)], ignore_index=True)
        labels_path = frame.attrs.get("path")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kiqa_version": __version__,
            "tf_version": tf.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image_size": [int(height), int(width)],
            "max_pixels": int(config.max_pixels),
            "decode_version": DECODE_VERSION,
            "pixels": "uint8 RGB [height, width, 3] from kiqa.image.decode_image (EXIF-oriented, "
            "antialiased bilinear resize of the whole image, rounded)",
            "labels": {
                "path": str(Path(labels_path).resolve()) if labels_path else None,
                "sha256": sha256_of(labels_path) if labels_path and Path(labels_path).is_file() else None,
            },
            "image_root": str(Path(root).resolve()),
            "count": len(images),
            "shards": shard_list,
            "images": images,
            "rejects": rejects.astype(str).to_dict(orient="records"),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        publish_directory(staging, out_dir, replace=True)  # the previous set is removed after
    return out_dir


def _write_shards(staging, frame, paths, good, config, shards, progress):
    """Decodes the good rows in label order and writes them into `shards` contiguous shards.

    Returns:
        (shard list for the manifest, per-image entries, late rejects as tuples).
    """
    decode = file_decoder(config.image_size, config.max_pixels)

    def load(row, path):
        return row, tf.cast(decode(path), tf.uint8)

    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(good, tf.int64), [paths[r] for r in good]))
    # The check above decoded every file; one changed since would fail here. It is then
    # dropped and named as a late reject instead of stopping the whole job.
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.ignore_errors(log_warning=True).prefetch(2)
    shard_of = {row: position * shards // len(good) for position, row in enumerate(good)}

    shard_list, images, written = [], [], set()
    writer, current = None, None
    try:
        with tqdm(total=len(good), desc="preparing images", unit="img", disable=not progress) as bar:
            for row, pixels in dataset.as_numpy_iterator():
                row = int(row)
                if writer is None or shard_of[row] != current:
                    if writer is not None:
                        writer.close()
                    current = shard_of[row]
                    shard_list.append({"file": f"shard-{len(shard_list):05d}.tfrecord", "count": 0})
                    writer = tf.io.TFRecordWriter(str(staging / shard_list[-1]["file"]))
                name, mos = str(frame["image_name"].iat[row]), float(frame["mos"].iat[row])
                writer.write(_example(pixels, name, mos, record=len(images)))
                shard_list[-1]["count"] += 1
                info = os.stat(paths[row])
                images.append({
                    "image_name": name, "mos": mos, "shard": len(shard_list) - 1,
                    "file_bytes": info.st_size, "file_mtime_ns": info.st_mtime_ns,
                })
                written.add(row)
                bar.update(1)
    finally:
        if writer is not None:
            writer.close()
    late = [
        (frame["image_name"].iat[row], paths[row], "passed the check but failed to decode when "
         "prepared (did the file change meanwhile?)")
        for row in good if row not in written
    ]
    return shard_list, images, late


def _example(pixels, name, mos, record):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
        "mos": tf.train.Feature(float_list=tf.train.FloatList(value=[mos])),
        # Position in the manifest's image list: lets a reader find a record's row without
        # parsing its pixels, whichever shards it was given.
        "record": tf.train.Feature(int64_list=tf.train.Int64List(value=[record])),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[pixels.shape[0]])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[pixels.shape[1]])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _check_replaceable(out_dir):
    """Only an empty folder or an earlier prepared set may be replaced: never user data."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another output folder")
    if any(out_dir.iterdir()) and _read_manifest(out_dir / MANIFEST).get("format") != FORMAT:
        raise DataError(
            f"{out_dir} exists and is not a kiqa prepared set (no {MANIFEST} of format {FORMAT!r}); "
            "refusing to replace it: choose another output folder or remove it yourself"
        )


def inspect_prepared(out_dir, config):
    """Whether a prepared folder can stand in for decoding the files under `config`.

    Args:
        out_dir: a prepared folder.
        config: `TrainConfig` of the run (image_size, max_pixels).

    Returns:
        (Prepared, None) when it can be used, else (None, why) with why naming the
        difference and the command that fixes it.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        return None, f"no prepared set at {out_dir} (no {MANIFEST})"
    manifest = _read_manifest(path)
    redo = f"run `kiqa prepare` again to rebuild {out_dir}"
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        return None, (f"{path} is not a kiqa prepared set of format version {FORMAT_VERSION} "
                      f"(unreadable, or made by another kiqa version); {redo}")
    try:
        return _inspect(out_dir, manifest, config, redo)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        return None, f"{path} is malformed ({type(err).__name__}: {err}); {redo}"


def _inspect(out_dir, manifest, config, redo):
    size = tuple(manifest.get("image_size", ()))
    want = tuple(config.image_size)
    if size != want:
        return None, (f"{out_dir} holds images resized to {'x'.join(map(str, size))} but the run uses "
                      f"{want[0]}x{want[1]}; prepare it again at {want[0]}x{want[1]} (`kiqa prepare`)")
    if manifest.get("max_pixels") != config.max_pixels:
        return None, (f"{out_dir} was prepared with max_pixels={manifest.get('max_pixels')} but the "
                      f"run uses {config.max_pixels} (a different set of images is rejected); {redo}")
    if manifest.get("decode_version") != DECODE_VERSION:
        return None, (f"{out_dir} was decoded by an older kiqa image function (version "
                      f"{manifest.get('decode_version', 1)}, now {DECODE_VERSION}): its pixels differ; {redo}")
    missing = [s["file"] for s in manifest["shards"] if not (out_dir / s["file"]).is_file()]
    if missing:
        return None, f"{out_dir} is missing shard file(s) {missing[:_LISTED]}; {redo}"
    changed = _changed_sources(manifest)
    if changed:
        more = f" and {len(changed) - _LISTED} more" if len(changed) > _LISTED else ""
        return None, (f"{len(changed)} source image(s) changed since {out_dir} was prepared "
                      f"({', '.join(changed[:_LISTED])}{more}); {redo}")
    return Prepared(out_dir, manifest), None


def open_prepared(out_dir, config):
    """The prepared set in `out_dir`, or None (the reason is logged) if it cannot be used.

    Args:
        out_dir: a prepared folder, e.g. `default_prepared_dir(labels, size)`.
        config: `TrainConfig` of the run.

    Returns:
        A `Prepared`, or None. `inspect_prepared` returns the reason instead of logging it.
    """
    prepared, why = inspect_prepared(out_dir, config)
    if prepared is None:
        # An absent folder is the normal case; a present but unusable one is worth a warning.
        level = logging.WARNING if (Path(out_dir) / MANIFEST).exists() else logging.DEBUG
        logger.log(level, "not using the prepared set: %s", why)
    return prepared


def _changed_sources(manifest):
    """Images whose source file exists but differs (size or mtime) from when it was prepared.

    A missing source is fine: the pixels are in the shards, so the files may be deleted
    or moved once prepared. 10,000 stat calls take a few tens of milliseconds.
    """
    root = Path(manifest.get("image_root", "."))
    changed = []
    for entry in manifest["images"]:
        try:
            info = os.stat(root / entry["image_name"])
        except OSError:
            continue
        if (info.st_size, info.st_mtime_ns) != (entry["file_bytes"], entry["file_mtime_ns"]):
            changed.append(entry["image_name"])
    return changed


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """A usable prepared set (from `open_prepared`).

    Attributes:
        path: the prepared folder.
        manifest: its parsed `manifest.json`.
    """

    path: Path
    manifest: dict

    @property
    def image_size(self):
        """(height, width) the images were resized to."""
        return tuple(self.manifest["image_size"])

    @property
    def image_names(self):
        """Names of the stored images, in record order (the label file's order)."""
        return [entry["image_name"] for entry in self.manifest["images"]]

    @property
    def rejects(self):
        """DataFrame (image_name, path, reason) of the images left out when prepared."""
        return pd.DataFrame(self.manifest["rejects"], columns=REJECT_COLUMNS)

    def check_names(self, image_names):
        """Why this set cannot serve `image_names`, or None if it can.

        `image_names` must all be stored, without repeats, and in the stored (label
        file) order: a TFRecord file is read front to back, so that order is what lets
        the elements come out exactly in the order `make_dataset` gives. Every split
        kiqa makes keeps the label file's order.
        """
        record = {name: i for i, name in enumerate(self.image_names)}
        names = [str(n) for n in image_names]
        absent = [n for n in names if n not in record]
        if absent:
            return (f"{len(absent)} image(s) are not in the prepared set {self.path} (rejected when "
                    f"prepared, or added to the labels since): {absent[:_LISTED]}; run `kiqa prepare` "
                    "again, or train without the prepared set")
        if len(set(names)) != len(names):
            return "image_names lists an image more than once"
        order = np.array([record[n] for n in names])
        if np.any(np.diff(order) <= 0):
            first = names[int(np.argmax(np.diff(order) <= 0)) + 1]
            return (f"image_names are not in the prepared set's order (the label file's order when "
                    f"{self.path} was made; first out of order: {first!r}); keep the label file's order")
        return None

    def dataset(self, image_names, mos, config, training, with_index=False, part="train", epochs=None,
                first_epoch=0, dist=None):
        """The input pipeline for one part of a split, read from the shards.

        Same elements as `kiqa.data.pipeline.make_dataset(paths, mos, config, training,
        with_index, part)` with a cache: `(image, {"mos": float32 [B]})` with image
        float32 [B, H, W, 3] 0..255, or `({"image": ..., "index": int64 [B]}, {"mos": ...})`
        with `with_index`; the same pixels, and in training
        the same seeded buffer shuffle (reshuffled every epoch), horizontal flips and
        batching. Shards holding none of the names are not read.

        Args:
            image_names: the part's image names, in label-file order (see `check_names`).
            mos: 0-100 targets aligned with `image_names` (used instead of the stored ones,
                so the label file stays the authority).
            config: `TrainConfig` (image_size must match; batch_size, hflip, seed, cache:
                "memory" also keeps the uint8 images in memory after the first epoch).
            training: shuffle and augment.
            with_index: add `"index"` (position in `image_names`) to the features.
            part: accepted for the same call as `make_dataset`; unused (no file cache).
            epochs: training only: see `make_dataset` (epochs by (seed, epoch)).
            first_epoch: training only: see `make_dataset`.
            dist: optional [n, 5] rating-level shares aligned with `image_names` (see
                `make_dataset`).

        Returns:
            A batched, prefetched `tf.data.Dataset`.

        Raises:
            ConfigError: `config.image_size` differs from the stored size.
            DataError: the names cannot be served (see `check_names`).
        """
        if tuple(config.image_size) != self.image_size:
            raise ConfigError(
                f"{self.path} holds images at {self.image_size}, the config asks for {tuple(config.image_size)}"
            )
        names = [str(n) for n in image_names]
        why = self.check_names(names)
        if why:
            raise DataError(why)
        n = len(names)
        height, width = self.image_size
        entries = self.manifest["images"]
        record = {entry["image_name"]: i for i, entry in enumerate(entries)}
        # Row in image_names of every stored record, -1 for records this part does not use.
        positions = np.full(len(entries), -1, np.int64)
        positions[[record[name] for name in names]] = np.arange(n)
        used = sorted({entries[record[name]]["shard"] for name in names})
        files = [str(self.path / self.manifest["shards"][s]["file"]) for s in used]
        positions = tf.constant(positions)
        expected_names = tf.constant(names)
        targets = tf.constant(mos, tf.float32)
        shares = None if dist is None else tf.constant(dist, tf.float32)

        def locate(serialized):
            row = tf.io.parse_single_example(serialized, {"record": tf.io.FixedLenFeature([], tf.int64)})
            return serialized, tf.gather(positions, row["record"])

        def parse(serialized, position):
            features = tf.io.parse_single_example(serialized, {
                "image": tf.io.FixedLenFeature([], tf.string),
                "image_name": tf.io.FixedLenFeature([], tf.string),
            })
            same = tf.debugging.assert_equal(
                features["image_name"], expected_names[position],
                message=f"a shard of {self.path} does not match its manifest; run `kiqa prepare` again",
            )
            with tf.control_dependencies([same]):
                image = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [height, width, 3])
            element = {"image": image, "mos": targets[position], "index": position}
            if shares is not None:
                element["dist"] = shares[position]
            return element

        # Files are read one after another (no parallel interleave) so records keep the
        # label-file order that make_dataset's shuffle starts from.
        dataset = tf.data.TFRecordDataset(files, buffer_size=READ_BUFFER_BYTES)
        dataset = dataset.map(locate, num_parallel_calls=AUTOTUNE, deterministic=True)
        dataset = dataset.filter(lambda serialized, position: position >= 0)
        dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
        if config.cache == "memory":
            dataset = dataset.cache()
        if training:
            return shuffled_epochs(dataset, n, config, with_index, first_epoch, epochs)
        dataset = dataset.map(lambda e: dict(e, image=tf.cast(e["image"], tf.float32)))
        return finish_dataset(dataset, config, False, with_index)


def _read_manifest(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


