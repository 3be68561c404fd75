"""The one image function: encoded bytes -> check header -> decode -> orient -> resize.

Training, evaluation, local scoring and the SavedModel's `image_bytes` signature all call
`decode_image`, so a model sees the same pixels wherever it runs (train/serve skew is a
bug; tests/test_image.py and the export parity check prove there is none).

Decisions, the same on every path:
- EXIF orientation is applied (TF's decoders ignore it; phone photos would be scored
  lying on their side, and a portrait photo squeezed into a landscape frame). JPEG's
  APP1 Exif tag is read in-graph, so TF Serving does the same as training.
- The whole image is resized to the configured (height, width) with antialiasing; there
  is no crop (a crop loses global composition) and no padding (flat borders would be
  scored). KonIQ's photos are all 4:3, so the default 384x512 keeps their aspect exactly;
  other aspect ratios are stretched. Pick `image_size` to match your data.
- The result is rounded to the 8-bit grid (0..255 integers as float32): what a resized
  image saved losslessly would hold, so an 8-bit cache of resized images is exact.
- Grey, palette, CMYK and 16-bit images become 8-bit RGB; animated GIFs give their first
  frame; TIFF is rejected with a clear error (TF has no TIFF decoder).
- The header's pixel count is checked against `max_pixels` before anything is decoded.
"""

import os
import stat
from pathlib import Path

import tensorflow as tf

from kiqa import imageinfo
from kiqa.config import DEFAULT_MAX_PIXELS
from kiqa.errors import ImageError

# Encoded files larger than this are refused before reading: a JPEG of a 64 MP photo
# is ~30 MB, and `tf.io.read_file` on a link to /dev/zero reads until memory runs out.
DEFAULT_MAX_BYTES = 200 * 1024 * 1024

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def decode_image(contents, size, max_pixels=DEFAULT_MAX_PIXELS, name=None):
    """Decodes encoded image bytes into a model-ready float32 RGB image.

    Works eagerly, inside `tf.data.Dataset.map` and inside a SavedModel signature.

    Args:
        contents: scalar `tf.string` tensor of encoded JPEG, PNG, GIF, BMP or WebP bytes.
        size: (height, width) of the output.
        max_pixels: images whose header announces more pixels are rejected before decoding.
        name: optional scalar string (e.g. the file path) named in error messages.

    Returns:
        float32 tensor of shape [height, width, 3] with integer values in 0..255.

    Raises:
        tf.errors.InvalidArgumentError: the bytes are not a decodable image, the format
            is unsupported, or the header announces more than `max_pixels` pixels.
    """
    height, width = int(size[0]), int(size[1])
    contents = tf.convert_to_tensor(contents, dtype=tf.string)
    header = imageinfo.check_header(contents, max_pixels, name=name)
    with tf.control_dependencies([header]):
        # dtype=uint8 also scales 16-bit PNGs down to 8 bits; channels=3 makes grey,
        # palette and CMYK images RGB; expand_animations=False keeps GIFs 3-D.
        image = tf.io.decode_image(
            contents, channels=3, dtype=tf.uint8, expand_animations=False
        )
    image = imageinfo.apply_orientation(image, imageinfo.exif_orientation(contents))
    image = tf.image.resize(
        tf.cast(image, tf.float32), (height, width), method="bilinear", antialias=True
    )
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    image.set_shape([height, width, 3])
    return image


def read_image_bytes(path, max_bytes=DEFAULT_MAX_BYTES):
    """Reads an image file's bytes, refusing what is not a plain, bounded file.

    Args:
        path: file to read.
        max_bytes: files larger than this are refused.

    Returns:
        The file's bytes.

    Raises:
        ImageError: the path is missing, not a regular file (a device, a FIFO, a
            folder), larger than `max_bytes`, or unreadable.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})", path=str(path)) from err
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(
            f"{path}: not a regular file (a device, pipe or folder); remove it from the input",
            path=str(path),
        )
    if info.st_size > max_bytes:
        raise ImageError(
            f"{path}: {info.st_size} bytes is over the {max_bytes}-byte cap for one image",
            path=str(path),
        )
    try:
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})", path=str(path)) from err


def load_image(path, size, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """Reads and decodes one file eagerly (for scoring and notebooks).

    Args:
        path: image file.
        size: (height, width) of the output.
        max_pixels: header pixel cap.
        max_bytes: file size cap.

    Returns:
        float32 tensor [height, width, 3], values 0..255.

    Raises:
        ImageError: naming the file and why it cannot be used.
    """
    contents = read_image_bytes(path, max_bytes=max_bytes)
    try:
        return decode_image(contents, size, max_pixels=max_pixels, name=str(path))
    except tf.errors.OpError as err:
        raise ImageError(f"{path}: {describe_decode_error(err)}", path=str(path)) from err


def describe_decode_error(err):
    """Turns a TF decode error into one readable line (TF's messages carry op traces)."""
    message = (getattr(err, "message", None) or str(err)).strip()
    # In graphs (tf.data, SavedModels) check_header's text sits inside
    # "assertion failed: [...]" after a "Graph execution error:" preamble.
    if "assertion failed: [" in message:
        message = message.split("assertion failed: [", 1)[1].split("]", 1)[0]
    first = message.splitlines()[0] if message else type(err).__name__
    return first.split(" [[")[0].strip()
