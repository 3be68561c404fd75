"""The built-in demo dataset: real photographs with known distortions. It is NOT KonIQ.

The photographs are the colour and grey sample photos that ship inside scikit-image
(astronaut, coffee, the cat Chelsea, a rocket launch, two motorcycles, the cameraman and
coins), so nothing is downloaded. Each photo gives a few 4:3 crops; each crop is written pristine and with
Gaussian blur, Gaussian noise and JPEG compression at five graded severities. Its "MOS"
is a made-up score that falls monotonically with severity (plus a little seeded rater
noise), on KonIQ's 0-100 scale.

Rating distributions (`c1..c5`, `c_total`, raw `MOS` and `SD`) come from a stated rater
model: each image has a latent quality on KonIQ's 1-5 scale (its 0-100 score mapped back
through KonIQ's fitted line, `kiqa.distribution`), and each of 100-139 simulated raters
votes round(latent + e), clipped to 1..5, with e ~ Normal(0, s) and
s = `RATER_SD_PRISTINE` + `RATER_SD_GROWTH[distortion]` * level: people disagree more the
more damaged an image is, and more about noise (some take grain for detail) than about
JPEG blocks. So the spread depends on the damage and its kind, not on the score alone. The CSV has the columns of KonIQ's download file
(`koniq10k_scores_and_distributions.csv`) plus `source_image` (the sample photo:
random splits keep all its crops on one side, so test photos are never seen in
training), `crop`, `distortion` and `level`, so every KonIQ code path runs on it.

What it is good for: showing that the pipeline, labels, loss and metrics work end to end,
in seconds. What it is not: a benchmark. The distortions are synthetic and the scores
are a formula, not human ratings.
"""

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from kiqa.contract import KONIQ_MOS_INTERCEPT, KONIQ_MOS_SLOPE
from kiqa.errors import OutputError
from kiqa.fsutil import publish_directory, staged_directory

# 3: rating distributions from the rater model below (the 0-100 scores are those of v2).
DEMO_VERSION = 3
LEVELS = 5
# Sample photos that ship inside scikit-image (no download): real photographs only.
# Read from the package folder by file name: skimage.data's loader functions may try
# to fetch missing files from the network. Natural photographs only: the moon, Hubble,
# microscopy and texture samples have a "pristine" look (dark, soft, busy) that a small
# model reads as damage, so a photo-level split would test content, not quality.
PHOTOS = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "camera.png", "coins.png",
)
# Per-level severity of each distortion, chosen so that level 5 is plainly bad at 96x128.
DISTORTIONS = {
    "blur": (0.5, 0.8, 1.2, 1.8, 2.6),  # Gaussian radius in pixels at 96x128
    "noise": (5.0, 10.0, 18.0, 28.0, 42.0),  # Gaussian sigma in 8-bit levels
    "jpeg": (50, 30, 18, 10, 5),  # JPEG quality
}
PRISTINE_MOS = 82.0
MOS_DROP_PER_LEVEL = 13.0
RATER_NOISE = 2.0
# The rater model of the rating distributions (module docstring): SD of one rater's vote
# around the image's latent 1-5 quality, growing with the damage level at a rate per kind.
RATER_SD_PRISTINE = 0.45
RATER_SD_GROWTH = {"pristine": 0.0, "blur": 0.10, "noise": 0.20, "jpeg": 0.14}


def default_demo_dir():
    """Where the demo data is kept: `$KIQA_HOME/demo-v<N>` (default ~/.cache/kiqa)."""
    home = os.environ.get("KIQA_HOME") or Path.home() / ".cache" / "kiqa"
    return Path(home) / f"demo-v{DEMO_VERSION}"


def demo_mos(level, rng):
    """The demo score of an image at a severity level (0 = pristine), on 0-100."""
    return float(np.clip(PRISTINE_MOS - MOS_DROP_PER_LEVEL * level + rng.normal(0, RATER_NOISE), 1, 99))


def _photos():
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for filename in PHOTOS:
        with Image.open(folder / filename) as photo:
            yield Path(filename).stem, photo.convert("RGB")


def _crop(photo, size, rng):
    """A random 4:3 crop covering 60-100% of the photo's width, resized to `size`."""
    height, width = size
    aspect = width / height
    max_w = min(photo.width, int(photo.height * aspect))
    crop_w = int(max_w * rng.uniform(0.6, 1.0))
    crop_h = int(crop_w / aspect)
    left = int(rng.integers(0, photo.width - crop_w + 1))
    top = int(rng.integers(0, photo.height - crop_h + 1))
    box = (left, top, left + crop_w, top + crop_h)
    return photo.crop(box).resize((width, height), Image.LANCZOS)


def _distort(image, kind, level, rng):
    """Returns JPEG bytes of `image` with distortion `kind` at `level` (1..5), or pristine (0)."""
    quality = 95
    if level and kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(DISTORTIONS["blur"][level - 1]))
    elif level and kind == "noise":
        noisy = np.asarray(image, np.float32) + rng.normal(0, DISTORTIONS["noise"][level - 1], (image.height, image.width, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    elif level and kind == "jpeg":
        quality = DISTORTIONS["jpeg"][level - 1]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _vote_columns(mos, kind, level, rng):
    """KonIQ-style vote fractions c1..c5, count, raw 1-5 MOS and SD from the rater model."""
    latent = (mos - KONIQ_MOS_INTERCEPT) / KONIQ_MOS_SLOPE
    spread = RATER_SD_PRISTINE + RATER_SD_GROWTH[kind] * level
    votes = int(rng.integers(100, 140))  # raters per image, not the MOS scale
    # standard_normal draws exactly what v2's rng.normal(raw, 0.55, votes) drew, so the
    # random stream, and with it every image and 0-100 score, is v2's.
    ratings = np.clip(np.round(latent + spread * rng.standard_normal(votes)), 1, 5)
    fractions = [float(np.mean(ratings == k)) for k in range(1, 6)]
    return fractions, votes, float(ratings.mean()), float(ratings.std(ddof=1))


def write_demo_dataset(out_dir, crops_per_photo=4, size=(96, 128), seed=0):
    """Writes the demo dataset: `labels.csv` and `images/*.jpg`.

    Written to a temporary folder and renamed into place, so an interrupted run never
    leaves a half-written dataset that looks complete.

    Args:
        out_dir: folder to create (must not exist, or be empty).
        crops_per_photo: crops per sample photo; 4 gives 8 x 4 x 16 = 512 images.
        size: (height, width) of the written images; 4:3 like KonIQ.
        seed: seeds crops, noise and rater noise.

    Returns:
        Path of the written `labels.csv`.
    """
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        (staging / "images").mkdir()
        rng = np.random.default_rng(seed)
        rows = []
        for photo_name, photo in _photos():
            for crop_index in range(crops_per_photo):
                crop = _crop(photo, size, rng)
                variants = [("pristine", 0)] + [(kind, level) for kind in DISTORTIONS for level in range(1, LEVELS + 1)]
                for kind, level in variants:
                    name = f"{photo_name}_{crop_index}_{kind}{level}.jpg"
                    (staging / "images" / name).write_bytes(_distort(crop, kind, level, rng))
                    mos = demo_mos(level, rng)
                    fractions, votes, raw, sd = _vote_columns(mos, kind, level, rng)
                    rows.append(
                        dict(image_name=name, c1=fractions[0], c2=fractions[1], c3=fractions[2],
                             c4=fractions[3], c5=fractions[4], c_total=votes, MOS=raw, SD=sd,
                             MOS_zscore=mos, source_image=photo_name, crop=crop_index,
                             distortion=kind, level=level)
                    )
        pd.DataFrame(rows).to_csv(staging / "labels.csv", index=False)
        if (out_dir / "labels.csv").is_file():
            return out_dir / "labels.csv"  # another process finished first; keep its copy
        publish_directory(staging, out_dir)  # only an empty folder may be replaced
    return out_dir / "labels.csv"


def demo_dataset(out_dir=None):
    """The demo dataset's label file, written on first use (a few seconds).

    Args:
        out_dir: folder for the data; default `default_demo_dir()`.

    Returns:
        Path of `labels.csv` (images are in `images/` beside it).

    Raises:
        OutputError: the folder cannot be written (a read-only home without KIQA_HOME).
    """
    out_dir = Path(out_dir) if out_dir else default_demo_dir()
    labels = out_dir / "labels.csv"
    if not labels.is_file():
        try:
            write_demo_dataset(out_dir)
        except OSError as err:
            # A read-only home (a container, a shared account) without KIQA_HOME lands here.
            raise OutputError(
                f"cannot write the demo data to {out_dir}: {err.strerror or err}; set KIQA_HOME to a "
                f"writable folder (now {os.environ.get('KIQA_HOME') or 'unset, so ~/.cache/kiqa'})",
                path=out_dir, errno_=err.errno, reason=err.strerror) from err
    return labels
