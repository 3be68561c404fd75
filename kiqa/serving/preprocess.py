"""kiqa's preprocessing in plain Pillow + numpy, for users of the ONNX and LiteRT exports.

The SavedModel's `serving_default` signature decodes images inside the graph; an ONNX or
LiteRT model takes float pixels, so whoever feeds it must prepare them the way kiqa's
`kiqa.image.decode_image` does, or scores shift (a missing EXIF turn or another resize
moves a score by whole MOS points). `preprocess_image` is that rule, with no TensorFlow:

1. Refuse images whose header announces more than `max_pixels` pixels (before decoding).
2. First frame only (animated GIF / WebP).
3. JPEG: decode at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `Image.draft`, what
   libjpeg's scaled decoding does) with the largest ratio r whose decoded size,
   ceil(h / r) x ceil(w / r), still covers the target on both axes after the EXIF turn.
4. Apply the EXIF orientation tag (JPEG, PNG, WebP).
5. Convert to 8-bit RGB: grey, palette and CMYK become RGB, alpha is dropped (not
   composited), 16-bit samples keep their high byte.
6. Unless the image already has the target size, resize the whole image (no crop, no
   padding: other aspect ratios are stretched) to height x width with an antialiased
   bilinear (triangle) filter, as `tf.image.resize(method="bilinear", antialias=True)`
   does, computed in float, then round half to even and clip to 0..255.
7. Return float32 [height, width, 3] with integer values 0..255; batch with `np.stack`.

How close it is (tests/test_serving_preprocess.py on the real photos of
`shared/data/realset`): decoding, the draft scale, EXIF and RGB conversion are bit-exact
with TF (the same libjpeg, with the accurate integer DCT Pillow uses by default); the
resize differs from TF's by at most one 8-bit level at a few pixels, where the two float
implementations (Pillow's double coefficients, TF's float32 kernel) land on opposite sides
of a .5 rounding boundary. One level at a handful of pixels moves a score by far less than
kiqa's 0.05 MOS parity tolerance (measured in the same test).
"""

import io
import os

import numpy as np
from PIL import Image

from kiqa.contract import DEFAULT_MAX_PIXELS
from kiqa.errors import ImageError

# libjpeg's DCT-domain scales (kiqa.image._JPEG_RATIOS).
_JPEG_RATIOS = (1, 2, 4, 8)
# EXIF orientations that turn the image by 90 degrees (height and width swap).
_TURNED = (5, 6, 7, 8)
_EXIF_FORMATS = ("JPEG", "PNG", "WEBP", "MPO")


def preprocess_image(source, size, max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes one image file into the float pixels kiqa's ONNX / LiteRT models take.

    Args:
        source: a path, a binary file object, or the encoded bytes.
        size: (height, width) of the export (its kiqa.json `image_size`).
        max_pixels: images whose header announces more pixels are refused.

    Returns:
        float32 numpy array [height, width, 3], integer values in 0..255.

    Raises:
        ImageError: the file is not a decodable image, or is over the pixel cap.
    """
    height, width = int(size[0]), int(size[1])
    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        image = Image.open(source)
        stored_w, stored_h = image.size
        if stored_w * stored_h > max_pixels:
            raise ImageError(
                f"{name}: {stored_w}x{stored_h} pixels is over the {max_pixels}-pixel cap",
                path=str(name),
            )
        orientation = _orientation(image)
        if image.format in ("JPEG", "MPO"):
            _draft(image, orientation, height, width)
        image.seek(0)  # first frame of an animation
        image = _to_rgb(image)
        image = _orient(image, orientation)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's decode errors
        raise ImageError(f"{name}: not a decodable image ({err})", path=str(name)) from err
    if image.size == (width, height):
        return np.asarray(image, dtype=np.float32)
    return resize_like_tf(np.asarray(image, dtype=np.float32), height, width)


def jpeg_draft_ratio(stored_size, orientation, height, width):
    """The DCT scale kiqa decodes a JPEG at.

    Args:
        stored_size: (width, height) as stored in the file (before the EXIF turn).
        orientation: EXIF orientation 1..8.
        height, width: the target size.

    Returns:
        1, 2, 4 or 8: the largest r with ceil(dim / r) >= the target on both axes.
    """
    stored_w, stored_h = stored_size
    need_h, need_w = (width, height) if orientation in _TURNED else (height, width)
    ratio = 1
    for r in _JPEG_RATIOS[1:]:
        if -(-stored_h // r) >= need_h and -(-stored_w // r) >= need_w:
            ratio = r
    return ratio


def resize_like_tf(pixels, height, width):
    """`tf.image.resize(method="bilinear", antialias=True)` + round + clip, in numpy.

    Separable triangle filter with half-pixel centres; when shrinking, the filter is
    widened by the scale (antialiasing); weights are normalised to sum to one, and
    clipped at the borders, as TF's ScaleAndTranslate kernel does.

    Args:
        pixels: float array [h, w, channels].
        height, width: output size.

    Returns:
        float32 array [height, width, channels] of integers 0..255.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    rows = _weights(pixels.shape[0], height)
    cols = _weights(pixels.shape[1], width)
    # Columns first (TF's order), float32 like TF's kernel, as two BLAS products.
    out = np.tensordot(pixels, cols, axes=([1], [1]))  # [h, channels, width]
    out = np.tensordot(rows, out, axes=([1], [0]))  # [height, channels, width]
    out = out.transpose(0, 2, 1)
    return np.clip(np.round(out), 0.0, 255.0).astype(np.float32)


def _weights(in_size, out_size):
    """[out, in] float32 matrix of TF's antialiased triangle-filter weights."""
    scale = out_size / in_size
    inv = 1.0 / min(scale, 1.0)
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) / scale
    positions = np.arange(in_size, dtype=np.float64) + 0.5
    distance = np.abs(positions[None, :] - centres[:, None]) / inv
    weights = np.maximum(0.0, 1.0 - distance)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return weights.astype(np.float32)


def _orientation(image):
    if image.format not in _EXIF_FORMATS:
        return 1
    try:
        value = int(image.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # unreadable EXIF is ignored, as kiqa's in-graph reader does
    return value if 1 <= value <= 8 else 1


def _draft(image, orientation, height, width):
    ratio = jpeg_draft_ratio(image.size, orientation, height, width)
    if ratio == 1:
        return
    stored_w, stored_h = image.size
    # Pillow picks the largest scale s in (8, 4, 2, 1) with s <= min(W // w, H // h) of the
    # requested (w, h); asking for (W // r, H // r) gives exactly r (W // (W // r) lies in
    # [r, 2r) once W >= 2r, which the target's >= 1 pixel guarantees).
    image.draft("RGB", (stored_w // ratio, stored_h // ratio))
    expected = (-(-stored_w // ratio), -(-stored_h // ratio))
    if image.size != expected:
        raise ValueError(f"JPEG draft gave {image.size}, expected {expected}")


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the high byte, as TF's uint16 -> uint8 conversion does.
        grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    # Alpha (RGBA, LA, PA) is dropped, not composited: TF's channels=3 decode does the same.
    return image if image.mode == "RGB" else image.convert("RGB")


_TRANSPOSES = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _orient(image, orientation):
    for step in _TRANSPOSES.get(orientation, ()):
        image = image.transpose(step)
    return image
