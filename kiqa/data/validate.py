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

from kiqa.contract import DEFAULT_MAX_BYTES
from kiqa.data.koniq import DUPLICATE_REASON, MISSING_REASON, check_image_names, undecodable_bytes
from kiqa.errors import BadImagesError, ImageError, ImageFolderError
from kiqa.fsutil import has_undecodable_bytes, printable, tf_path
from kiqa.image import decode_image, describe_decode_error, read_image_bytes

REJECT_COLUMNS = ["image_name", "path", "reason"]
# At least this share of the images missing means the image folder is wrong (or the
# images were never downloaded), not that some files are bad.
WRONG_FOLDER_FRACTION = 0.5


def _decodable_indices(paths, config, progress):
    """Indices of `paths` that decode, found in one parallel tf.data pass.

    The decode runs in tf.data's own graph here, not through `kiqa.image.file_decoder`,
    whose graph is made once per process: tf.data instantiates its own for every pass (a
    pass over 32 small images took ~4.5 s on 2 cores, ~1.2 s through `file_decoder`), but
    in tf.data's graph the hostile corpus's frame bombs leave this pass's peak memory flat
    (1.7 MB), where through `file_decoder` tests/test_hostile.py's probe rose from 147 to
    199.5 MB of its 200 MB bound. Not converted by autograph: decode_image's graph ops need
    none, and the conversion cost ~7 s of a process's first training run. tf.data's default
    graph rewrites are off: they carry the whole function library and cost ~0.8 s of the
    ~3 s it takes to build the pass, for a pass that reads each file once (measured on the
    demo's 512 photos: 4.3 s with them, 3.4 s without).
    """
    size, max_pixels = config.image_size, config.max_pixels
    names = [tf_path(p) for p in paths]  # TF refuses str names holding non-UTF-8 bytes
    dataset = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), names))

    @tf.autograph.experimental.do_not_convert
    def check(index, path):
        return index, tf.shape(decode_image(tf.io.read_file(path), size, max_pixels=max_pixels, name=path))

    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    dataset = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().with_options(options)
    good = set()
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar:
        for index, _ in dataset.as_numpy_iterator():
            good.add(int(index))
            bar.update(1)
    return good


def _eager_reason(path, config):
    """Why one file failed the parallel pass: decoded once more, eagerly.

    One readable line for rejects.csv (which has its own path column).
    """
    try:
        contents = read_image_bytes(path)
        decode_image(contents, config.image_size, max_pixels=config.max_pixels, name=printable(path))
    except ImageError as err:
        return describe_decode_error(err, path)
    except tf.errors.OpError as err:
        return describe_decode_error(err, printable(path))
    return "failed to decode in the parallel pass (not reproducible eagerly)"


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
    lines = frame["line"].tolist() if "line" in frame.columns else [i + 2 for i in range(len(frame))]
    line_of = dict(zip(frame["image_name"], lines))
    rejects = [(name, "", _explain_encoding(name, reason, root, line_of.get(name))) for name, reason in problems]
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
            reason = _eager_reason(paths[row], config)
            rejects.append((frame["image_name"].iat[row], paths[row], reason))
            paths[row] = None
    return paths, pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def _explain_encoding(name, reason, root, line):
    """Adds the label file's line, the bytes and the fix to a missing name that is not UTF-8."""
    if MISSING_REASON not in reason or not has_undecodable_bytes(name):
        return reason
    raw = undecodable_bytes(name)
    hint = ""
    for encoding in ("cp1252", "latin-1"):
        other = raw.decode(encoding, "replace")
        if (Path(root) / other).exists():
            hint = f" A file named {other!r} exists: the label file is {encoding}, not UTF-8."
            break
    return (
        f"{reason}; line {line} of the label file names it with bytes that are not UTF-8 "
        f"({raw!r}) and no file has exactly this name.{hint} Re-save the label file as UTF-8 "
        "(names are file names as bytes, read as UTF-8)"
    )


def count_bad(rejects):
    """Rejects that count against max_bad_fraction: every one but a duplicate row."""
    return int((~rejects["reason"].str.startswith(DUPLICATE_REASON)).sum()) if len(rejects) else 0


def check_image_folder(frame, rejects, root):
    """Raises ImageFolderError when most images are missing (a wrong folder, not bad files).

    Raises:
        ImageFolderError: at least `WRONG_FOLDER_FRACTION` of the images are not found,
            carrying the folder, the counts and the first missing name.
    """
    missing = rejects[rejects["reason"].str.contains(MISSING_REASON, regex=False)] if len(rejects) else rejects
    if len(frame) and len(missing) >= WRONG_FOLDER_FRACTION * len(frame):
        first = missing["image_name"].iat[0]
        folder = Path(root).resolve()
        raise ImageFolderError(
            f"{len(missing)} of {len(frame)} images ({len(missing) / len(frame):.1%}) are not in the image "
            f"folder {folder} (first missing: {first!r}, looked for {folder / first}): the image folder is "
            "wrong, or the images are not there yet",
            folder=str(folder), n_missing=len(missing), n_images=len(frame), first_missing=first,
        )


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
        BadImagesError: `on_bad_images="stop"` and there are rejects, or more than
            `max_bad_fraction` of the images are bad; the message lists them.
            Duplicate rows (see `kiqa.data.koniq.check_image_names`) are dropped and
            listed, but neither stop a run nor count as bad.
    """
    bad = rejects[~rejects["reason"].str.startswith(DUPLICATE_REASON)] if len(rejects) else rejects
    if len(bad):
        listing = "\n".join(f"  {r.image_name}: {r.reason}" for r in bad.head(20).itertuples())
        more = f"\n  ... and {len(bad) - 20} more (all in rejects.csv)" if len(bad) > 20 else ""
        fraction = len(bad) / len(frame)
        if config.on_bad_images == "stop":
            raise BadImagesError(
                f"{len(bad)} of {len(frame)} images cannot be used:\n{listing}{more}\n"
                'Fix or remove them, or set on_bad_images="drop" to train without them.',
                n_bad=len(bad), n_images=len(frame), policy="stop", max_bad_fraction=config.max_bad_fraction,
            )
        if fraction > config.max_bad_fraction:
            raise BadImagesError(
                f"{len(bad)} of {len(frame)} images ({fraction:.1%}) cannot be used, more "
                f"than max_bad_fraction={config.max_bad_fraction:.1%} (wrong image folder?):\n"
                f"{listing}{more}\nCheck the image folder, or raise max_bad_fraction to drop them.",
                n_bad=len(bad), n_images=len(frame), policy="too_many", max_bad_fraction=config.max_bad_fraction,
            )
    kept = frame.assign(path=paths)
    return kept[kept["path"].notna()].reset_index(drop=True)


def check_labels(config, progress=True):
    """Reads a config's label file and checks every image, without applying the policy.

    Args:
        config: `TrainConfig`; `labels=None` means the built-in demo data.
        progress: show a progress bar while checking images.

    Returns:
        (frame, paths, rejects, root): the label table, resolved paths aligned with it
        (None for rejects), the rejects table and the image folder searched.

    Raises:
        ImageFolderError: most images are missing from the image folder.
    """
    from kiqa.data import koniq, synthetic

    labels_path = Path(config.labels) if config.labels else synthetic.demo_dataset()
    if config.path_column is not None:  # a plain labelled CSV: images beside it, as kiqa evaluate reads it
        from kiqa.data.labelled import read_for_training

        frame = read_for_training(labels_path, config.path_column, config.mos_column, config.scale)
        root = Path(config.images) if config.images else labels_path.parent
    else:
        frame = koniq.read_labels(labels_path)
        root = Path(config.images) if config.images else koniq.default_image_root(labels_path)
    paths, rejects = find_bad_images(frame, root, config, progress=progress)
    return frame, paths, rejects, root


def load_checked_labels(config, progress=True):
    """Reads a config's label file and checks every image, applying the bad-image policy.

    Args:
        config: `TrainConfig`; `labels=None` means the built-in demo data.
        progress: show a progress bar while checking images.

    Returns:
        (frame, rejects): the usable rows with a `path` column, and the rejects table.

    Raises:
        ImageFolderError: most images are missing (see `check_image_folder`).
        BadImagesError: see `apply_bad_image_policy`.
    """
    frame, paths, rejects, root = check_labels(config, progress)
    check_image_folder(frame, rejects, root)
    return apply_bad_image_policy(frame, paths, rejects, config), rejects
