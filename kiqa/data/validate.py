"""The pre-validation pass: every image is checked before training starts.

One undecodable file aborts `model.fit`, and `Dataset.ignore_errors` would hide which
file it was (and silently drop missing ones). So before a run, every image name is
resolved inside the image folder, every file is decoded once with the same function
training uses (header pixel cap first), and all problems are reported together, by
name, in `rejects.csv`. The user chooses whether to drop the rejects or stop; more than
`max_bad_fraction` bad images stops the run either way (a wrong folder, not bad luck).
"""

import os
from pathlib import Path

import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from kiqa.data.koniq import check_image_names
from kiqa.contract import DEFAULT_MAX_BYTES
from kiqa.errors import DataError, ImageError
from kiqa.image import decode_image, describe_decode_error, load_image

REJECT_COLUMNS = ["image_name", "path", "reason"]


def _decodable_indices(paths, config, progress):
    """Indices of `paths` that decode, found in one parallel tf.data pass."""
    size, max_pixels = config.image_size, config.max_pixels
    dataset = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), paths))
    dataset = dataset.map(
        lambda i, p: (i, tf.shape(decode_image(tf.io.read_file(p), size, max_pixels=max_pixels, name=p))),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    good = set()
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar:
        for index, _ in dataset.as_numpy_iterator():
            good.add(int(index))
            bar.update(1)
    return good


def _reason(err, path):
    """One readable line for rejects.csv (which has its own path column)."""
    return describe_decode_error(err, path)


def find_bad_images(frame, root, config, progress=True):
    """Checks every image of a label table: name, file, size, header and full decode.

    Args:
        frame: label table from `kiqa.data.koniq.read_labels`.
        root: image folder.
        config: `TrainConfig` (image_size, max_pixels).
        progress: show a progress bar.

    Returns:
        (paths, rejects): `paths` aligned with `frame` (None where rejected) and a
        DataFrame of rejects with columns image_name, path, reason.
    """
    paths, problems = check_image_names(frame, root)
    rejects = [(name, "", reason) for name, reason in problems]
    for row, path in enumerate(paths):
        if path is not None and os.path.getsize(path) > DEFAULT_MAX_BYTES:
            rejects.append((frame["image_name"].iat[row], path, f"over the {DEFAULT_MAX_BYTES}-byte cap"))
            paths[row] = None

    candidates = [row for row, path in enumerate(paths) if path is not None]
    if candidates:
        good = _decodable_indices([paths[row] for row in candidates], config, progress)
        for position, row in enumerate(candidates):
            if position in good:
                continue
            # Decode the failures once more, eagerly, to say why each one failed.
            try:
                load_image(paths[row], config.image_size, max_pixels=config.max_pixels)
                reason = "failed to decode in the parallel pass (not reproducible eagerly)"
            except ImageError as err:
                reason = _reason(err, paths[row])
            rejects.append((frame["image_name"].iat[row], paths[row], reason))
            paths[row] = None
    return paths, pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def apply_bad_image_policy(frame, paths, rejects, config):
    """Drops rejected rows, or stops, as the config says.

    Args:
        frame: label table.
        paths: resolved paths aligned with `frame` (None for rejects).
        rejects: DataFrame from `find_bad_images`.
        config: `TrainConfig` (on_bad_images, max_bad_fraction).

    Returns:
        The label table without rejected rows, with a `path` column.

    Raises:
        DataError: `on_bad_images="stop"` and there are rejects, or more than
            `max_bad_fraction` of the images are bad; the message lists them.
    """
    if len(rejects):
        listing = "\n".join(f"  {r.image_name}: {r.reason}" for r in rejects.head(20).itertuples())
        more = f"\n  ... and {len(rejects) - 20} more" if len(rejects) > 20 else ""
        fraction = len(rejects) / len(frame)
        if config.on_bad_images == "stop":
            raise DataError(
                f"{len(rejects)} of {len(frame)} images cannot be used:\n{listing}{more}\n"
                "Fix or remove them, or pass --on-bad-images drop to train without them."
            )
        if fraction > config.max_bad_fraction:
            raise DataError(
                f"{len(rejects)} of {len(frame)} images ({fraction:.1%}) cannot be used, more "
                f"than max_bad_fraction={config.max_bad_fraction:.1%} (wrong image folder?):\n"
                f"{listing}{more}\nCheck --images, or raise --max-bad-fraction to drop them."
            )
    kept = frame.assign(path=paths)
    return kept[kept["path"].notna()].reset_index(drop=True)


def load_checked_labels(config, progress=True):
    """Reads a config's label file and checks every image, applying the bad-image policy.

    Args:
        config: `TrainConfig`; `labels=None` means the built-in demo data.
        progress: show a progress bar while checking images.

    Returns:
        (frame, rejects): the usable rows with a `path` column, and the rejects table.
    """
    from kiqa.data import koniq, synthetic

    labels_path = Path(config.labels) if config.labels else synthetic.demo_dataset()
    frame = koniq.read_labels(labels_path)
    root = Path(config.images) if config.images else koniq.default_image_root(labels_path)
    paths, rejects = find_bad_images(frame, root, config, progress=progress)
    return apply_bad_image_policy(frame, paths, rejects, config), rejects
