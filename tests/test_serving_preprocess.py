"""The Pillow reference preprocessing gives kiqa's decode_image pixels (within one level)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kiqa.errors import ImageError
from kiqa.image import decode_image, load_image
from kiqa.serving.preprocess import jpeg_draft_ratio, preprocess_image, resize_like_tf

# The stated tolerance: the resize may land one 8-bit level apart at a few pixels
# (Pillow-free float64 weights vs TF's float32 kernel on a .5 rounding boundary).
MAX_LEVELS = 1.0
MAX_FRACTION_OFF = 0.01


def _compare(reference, kiqa):
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(kiqa, np.float64))
    return diff.max(), float((diff > 0).mean())


@pytest.mark.parametrize("size", [(384, 512), (32, 48)])
def test_real_photos_match_decode_image(realset, size):
    files = sorted((realset / "images").iterdir())
    assert len(files) >= 10
    for path in files:
        worst, fraction = _compare(preprocess_image(path, size), load_image(path, size))
        assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION_OFF, (path.name, worst, fraction)


def test_koniq_jpeg_draft_decode_is_exact(realset):
    """KonIQ 1024x768 -> 384x512 is the 1/2 DCT scale with no resize left: bit-exact."""
    files = sorted((realset / "images").glob("koniq_*_1024.jpg"))
    assert files
    for path in files:
        with Image.open(path) as image:
            assert jpeg_draft_ratio(image.size, 1, 384, 512) == 2
        np.testing.assert_array_equal(preprocess_image(path, (384, 512)), load_image(path, (384, 512)))


def _jpeg_with_orientation(pixels, orientation):
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_and_draft_follow_kiqa(orientation):
    rng = np.random.default_rng(orientation)
    pixels = np.clip(rng.normal(128, 40, (96, 160, 3)), 0, 255).astype(np.uint8)
    pixels[:20, :30] = 255  # a corner marker, so a wrong turn moves it
    contents = _jpeg_with_orientation(pixels, orientation)
    size = (40, 48) if orientation in (6, 8) else (48, 40)
    worst, fraction = _compare(preprocess_image(contents, size), decode_image(contents, size))
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION_OFF


def _encoded(image, fmt, **kwargs):
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def test_grey_palette_alpha_16bit_and_gif_become_kiqa_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    cases = {
        "grey png": _encoded(Image.fromarray(rgb[..., 0], "L"), "PNG"),
        "rgba png": _encoded(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG"),
        "palette png": _encoded(Image.fromarray(rgb).quantize(64), "PNG"),
        "16-bit png": _encoded(Image.fromarray((rng.integers(0, 65536, (40, 60))).astype(np.uint16)), "PNG"),
        "gif": _encoded(Image.fromarray(rgb).quantize(32), "GIF"),
        "bmp": _encoded(Image.fromarray(rgb), "BMP"),
    }
    for name, contents in cases.items():
        for size in [(40, 60), (32, 48)]:
            worst, fraction = _compare(preprocess_image(contents, size), decode_image(contents, size))
            assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION_OFF, (name, size, worst, fraction)


def test_resize_matches_tf_antialiased_bilinear_on_noise():
    rng = np.random.default_rng(1)
    for shape, out in [((768, 1024), (384, 512)), ((30, 40), (64, 90)), ((333, 517), (224, 224))]:
        x = rng.integers(0, 256, (*shape, 3)).astype(np.float32)
        tf_out = tf.clip_by_value(tf.round(tf.image.resize(x, out, "bilinear", antialias=True)), 0, 255)
        worst, fraction = _compare(resize_like_tf(x, *out), tf_out.numpy())
        assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION_OFF


def test_pixel_cap_and_garbage_are_refused_with_the_name(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageError, match=r"big.png: 100x100 pixels is over the 5000-pixel cap"):
        preprocess_image(path, (32, 32), max_pixels=5000)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.jpg: not a decodable image"):
        preprocess_image(bad, (32, 32))
