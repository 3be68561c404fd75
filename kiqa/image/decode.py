"""The one image function: encoded bytes -> check header -> decode -> orient -> resize.

Training, evaluation, local scoring and the SavedModel's `image_bytes` signature all call
`decode_image`, so a model sees the same pixels wherever it runs (train/serve skew is a
bug; tests/test_image_decode.py and the export parity check prove there is none).

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
  frame, and only that frame is decoded (the file is cut after it: giflib would decode
  every frame); an animated PNG gives its default image (libpng ignores the animation);
  an animated WebP, TIFF and JPEG XL are rejected with a clear error.
- The header's pixel count is checked against `max_pixels` before anything is decoded.
- A header that disagrees with the data is refused: a JPEG whose coded data is too short
  for the size its header announces (libjpeg would paint the rest grey), and pixels of
  any format that decode to another size than the header's.
"""

import functools
import os
import stat
from pathlib import Path

import tensorflow as tf

from kiqa.contract import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from kiqa.image import header
from kiqa.errors import ImageError
from kiqa.tferrors import clean_tf_message, error_text

# Bumped whenever decode_image's pixels change (2: scaled JPEG decoding with the
# accurate DCT; 3: a GIF's first frame is no longer padded to its largest later frame).
# Caches and prepared sets record it, so stale pixels are never reused.
DECODE_VERSION = 3


def decode_image(contents, size, max_pixels=DEFAULT_MAX_PIXELS, name=None):
    """Decodes encoded image bytes into a model-ready float32 RGB image.

    Works eagerly, inside `tf.data.Dataset.map` and inside a SavedModel signature.

    JPEGs are decoded in libjpeg's DCT domain at the largest scale 1/r (r in 1, 2, 4,
    8; `tf.io.decode_jpeg(ratio=r)`, Pillow's `Image.draft`) whose size still covers
    `size` on both axes after the EXIF turn; the antialiased resize does the rest and is
    skipped when nothing is left to do. The result equals Pillow's draft-mode decode bit
    for bit, at about half the CPU time of a full decode plus resize for KonIQ's photos
    (benchmarks/README.md, "The input pipeline", has the figures and the pixel cost).
    `dct_method="INTEGER_ACCURATE"` (libjpeg's and Pillow's default): TF's fast DCT costs
    the same here but differs from the pixels other IQA tools see.

    Args:
        contents: scalar `tf.string` tensor of encoded JPEG, PNG, GIF, BMP or WebP bytes.
        size: (height, width) of the output.
        max_pixels: images whose header announces more pixels are rejected before decoding.
        name: optional scalar string (e.g. the file path) named in error messages.

    Returns:
        float32 tensor of shape [height, width, 3] with integer values in 0..255.

    Raises:
        tf.errors.InvalidArgumentError: the bytes are not a decodable image, the format
            is unsupported (TIFF, JPEG XL, an animated WebP), the header announces more
            than `max_pixels` pixels, or it disagrees with the data (a JPEG too short for
            its announced size; pixels of another size than the header's). The message
            starts with `name` when given and carries no batch position of its own.
    """
    contents = tf.convert_to_tensor(contents, dtype=tf.string)
    stored_shape = header.check_header(contents, max_pixels, name=name)
    branch, orientation = decode_plan(contents, stored_shape, size)
    with tf.control_dependencies([stored_shape]):
        return decode_planned(contents, branch, orientation, size, stored_shape, name)


def decode_plan(contents, stored_shape, size):
    """The header half of `decode_image`: which decoder to run and how to turn the result.

    Split from `decode_planned` for the SavedModel's bytes signatures, which run the
    header half for a whole batch and the decode half inside tf.data (whose
    `ignore_errors` is the only way a graph can survive a decoder's error); tf.data
    re-instantiates its functions on every request, and the header parsers' loops made
    that cost 1.7 s a request.

    Args:
        contents: scalar `tf.string`, the encoded file.
        stored_shape: int64 [2] (height, width) from the header (`header.check_header`).
        size: (height, width) of the output.

    Returns:
        (branch, orientation): int32 index into the decoders, int EXIF orientation.
    """
    height, width = int(size[0]), int(size[1])
    is_jpeg = tf.equal(header.image_format(contents), "jpeg")
    orientation = header.exif_orientation(contents)
    branch = tf.where(
        is_jpeg,
        _jpeg_ratio_index(stored_shape, orientation, height, width),
        len(_JPEG_RATIOS),
    )
    return branch, orientation


def decode_planned(contents, branch, orientation, size, stored_shape, name=None):
    """The decode half of `decode_image`: decode, orient, resize, as `decode_plan` says.

    Only call it on bytes whose header passed `header.check_header`: it allocates
    whatever the header announces.

    Args:
        contents: scalar `tf.string`, the encoded file.
        branch, orientation: from `decode_plan`.
        size: (height, width) of the output.
        stored_shape: int64 [2] (height, width) from the header; pixels of another size
            are refused.
        name: optional scalar string put in front of an error message.

    Returns:
        float32 [height, width, 3], integer values in 0..255.
    """
    # For a GIF only its first image goes to the decoder (giflib decodes every frame).
    return decode_first_image(header.first_image(contents), branch, orientation, size, stored_shape, name)


def decode_first_image(first, branch, orientation, size, stored_shape, name=None):
    """`decode_planned` on bytes already cut by `header.first_image`.

    The SavedModel's bytes signatures run `header.first_image` for the whole request
    and only this in tf.data, which instantiates its functions anew for every request:
    the GIF walker's loops made that cost ~0.3 CPU-s a request.

    Args:
        first: scalar `tf.string`, `header.first_image` of the encoded file.
        branch, orientation, size, stored_shape, name: as for `decode_planned`.

    Returns:
        float32 [height, width, 3], integer values in 0..255.
    """
    height, width = int(size[0]), int(size[1])
    image = tf.switch_case(branch, _decoders(first))
    image = _check_decoded_shape(image, stored_shape, branch, name)
    image = header.apply_orientation(image, orientation)
    decoded = tf.shape(image)
    image = tf.cond(
        (decoded[0] == height) & (decoded[1] == width),
        lambda: tf.cast(image, tf.float32),
        lambda: _resize(image, height, width),
    )
    image.set_shape([height, width, 3])
    return image


# libjpeg's DCT-domain scales that `tf.io.decode_jpeg(ratio=...)` accepts, largest last.
_JPEG_RATIOS = (1, 2, 4, 8)


def _check_decoded_shape(image, stored_shape, branch, name):
    """Refuses pixels whose size is not the one the header announced.

    The header's size is what the pixel cap was checked against and what the JPEG scale
    was chosen for; a decoder that made something else of the data (TF's GIF canvas is
    its own invention, for one) must not slip past those checks. Before orientation, so
    the comparison is with the stored (unturned) size, scaled as libjpeg scales it
    (ceil(dim / ratio)).
    """
    ratio = tf.gather(tf.constant(_JPEG_RATIOS + (1,), tf.int64), branch)
    expected = (stored_shape + ratio - 1) // ratio
    decoded = tf.shape(image, out_type=tf.int64)[:2]
    text = tf.strings.as_string
    scaled = tf.where(
        ratio > 1,
        tf.strings.join([" at 1/", text(ratio), " scale, where ", text(expected[1]), "x",
                         text(expected[0]), " was expected"]),
        "",
    )
    message = tf.strings.join([
        "image header announces ", text(stored_shape[1]), "x", text(stored_shape[0]),
        " pixels, but its data decodes to ", text(decoded[1]), "x", text(decoded[0]), scaled,
        ": the header was altered or the file is damaged; re-encode the file from its source",
    ])
    return header.require(tf.reduce_all(decoded == expected), message, image, name=name)


def _decoders(contents):
    """`tf.switch_case` branches: one per JPEG ratio (decode_jpeg needs a Python int),
    then every other format. All give uint8 [h, w, 3]."""

    def jpeg(ratio):
        return lambda: tf.io.decode_jpeg(
            contents, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"
        )

    def other():
        # dtype=uint8 also scales 16-bit PNGs down to 8 bits; channels=3 makes grey,
        # palette and CMYK images RGB; expand_animations=False keeps GIFs 3-D.
        return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)

    return [jpeg(r) for r in _JPEG_RATIOS] + [other]


def _jpeg_ratio_index(stored_shape, orientation, height, width):
    """Index into _JPEG_RATIOS of the largest ratio whose decode still covers the target.

    libjpeg scales each axis to ceil(dim / ratio). Orientations 5-8 turn the image by
    90 degrees after decoding, so the target's height is then measured on the stored
    width.
    """
    turned = (orientation >= 5) & (orientation <= 8)
    needed = tf.where(
        turned,
        tf.constant([width, height], tf.int64),
        tf.constant([height, width], tf.int64),
    )
    index = tf.constant(0, tf.int32)
    for ratio in _JPEG_RATIOS[1:]:  # ceil(dim / r) only shrinks as r grows: count the fits
        scaled = (stored_shape + (ratio - 1)) // ratio
        index += tf.cast(tf.reduce_all(scaled >= needed), tf.int32)
    return index


@functools.lru_cache(maxsize=8)
def traced_decoder(height, width):
    """`decode_image` as one traced graph for one output size, shared by the process.

    Per-file eager op dispatch costs more than the decode itself (16 ms eager against
    4 ms traced for a small JPEG), and tracing takes seconds, so one trace serves every
    job of the process: the pixel cap and the name are inputs, not constants.

    Args:
        height, width: the output size (ints).

    Returns:
        A function (contents: scalar string, max_pixels: int64 scalar, name: scalar
        string) -> float32 [height, width, 3]; errors surface per call.
    """

    # autograph=False: decode_image's graph ops need no conversion, and autograph's
    # rewriting of every function it calls was over half of the ~12 s trace.
    @tf.function(input_signature=[
        tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)
    ], autograph=False)
    def decode(contents, max_pixels, name):
        return decode_image(contents, (height, width), max_pixels=max_pixels, name=name)

    return decode


def file_decoder(size, max_pixels):
    """A `tf.data.Dataset.map` function: an image file's path -> its `decode_image` pixels.

    tf.data instantiates a map function's graph anew for every iterator, and the header
    parsers' bounded loops and branches (about 5,700 nodes) made that cost ~1.5 s per
    iterator: each training epoch's validation data, each evaluation, each prepared set.
    The decode therefore runs as `traced_decoder`'s graph, instantiated once per process,
    called through `tf.py_function`; tf.data's parallel calls still decode side by side
    (TF releases the GIL while the graph runs: the same images per second, measured).
    The pixels are `decode_image`'s; a file that fails raises an error the pipeline's
    `ignore_errors` drops, and the pre-validation pass names it.

    Args:
        size: (height, width) of the output.
        max_pixels: header pixel cap.

    Returns:
        A function: scalar `tf.string` path -> float32 [height, width, 3].
    """
    height, width = int(size[0]), int(size[1])
    decode = traced_decoder(height, width)
    cap = int(max_pixels)

    def run(path):
        return decode(tf.io.read_file(path), tf.constant(cap, tf.int64), path)

    def decode_file(path):
        image = tf.py_function(run, [path], tf.float32, name="kiqa_decode_file")
        image.set_shape([height, width, 3])
        return image

    return decode_file


def _resize(image, height, width):
    image = tf.image.resize(
        tf.cast(image, tf.float32), (height, width), method="bilinear", antialias=True
    )
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


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
        raise ImageError(f"{path}: {describe_decode_error(err, path)}", path=str(path)) from err


# What every path says about a file whose header passes but whose data the decoder
# refuses: `kiqa score` fills in TF's own message, the SavedModel's signatures (which
# cannot catch TF's message in the graph) the format's name.
UNDECODABLE_MESSAGE = (
    "cannot decode the image ({reason}); the file is corrupt or truncated: re-encode or replace it"
)

def describe_decode_error(err, path=None):
    """Turns a TF decode error into one readable line (`kiqa.tferrors.clean_tf_message`).

    Args:
        err: a `tf.errors.OpError` (or any exception).
        path: if given, a leading "<path>: " is dropped (callers name the file themselves).

    Returns:
        One line of text.
    """
    text = clean_tf_message(error_text(err), fallback=type(err).__name__)
    while path and text.startswith(f"{path}: "):
        text = text[len(str(path)) + 2:]
    return text
