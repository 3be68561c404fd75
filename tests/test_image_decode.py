"""The one image function, eagerly and inside tf.data (they must agree to the pixel)."""

import io

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from kiqa.errors import ImageError
from kiqa.image import decode_image, load_image, read_image_bytes

SIZE = (48, 64)


def encode(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(height=120, width=160, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def samples():
    rgb = photo()
    grey = rgb[..., 0]
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    sixteen = io.BytesIO()
    Image.fromarray((grey.astype(np.uint16) * 257)).save(sixteen, format="PNG")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": encode(rgb, "JPEG", quality=95),
        "png": encode(rgb, "PNG"),
        "grey_png": encode(grey, "PNG"),
        "cmyk_jpeg": cmyk.getvalue(),
        "png16": sixteen.getvalue(),
        "bmp": encode(rgb, "BMP"),
        "webp": encode(rgb, "WEBP", lossless=True),
        "animated_gif": gif.getvalue(),
    }


@pytest.mark.parametrize("kind", sorted(samples()))
def test_every_supported_format_becomes_rgb_at_the_size(kind):
    image = decode_image(samples()[kind], SIZE).numpy()
    assert image.shape == (*SIZE, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 255
    np.testing.assert_array_equal(image, np.round(image))  # on the 8-bit grid
    assert image.std() > 10  # real content, not a blank


def test_lossless_formats_agree_with_each_other():
    data = samples()
    png, bmp, webp = (decode_image(data[k], SIZE).numpy() for k in ("png", "bmp", "webp"))
    np.testing.assert_array_equal(png, bmp)
    np.testing.assert_array_equal(png, webp)


def test_grey_and_16_bit_match_the_8_bit_grey_image():
    data = samples()
    grey = decode_image(data["grey_png"], SIZE).numpy()
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    sixteen = decode_image(data["png16"], SIZE).numpy()
    assert np.abs(sixteen - grey).max() <= 1


def test_resize_is_antialiased():
    # A one-pixel checkerboard averages to grey when antialiased; plain bilinear aliases.
    board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    image = decode_image(encode(np.stack([board] * 3, -1), "PNG"), (32, 32)).numpy()
    assert np.abs(image - 127.5).max() < 3


def test_eager_and_dataset_map_agree():
    data = samples()
    kinds = sorted(data)
    eager = np.stack([decode_image(data[k], SIZE).numpy() for k in kinds])
    dataset = tf.data.Dataset.from_tensor_slices([data[k] for k in kinds]).map(
        lambda b: decode_image(b, SIZE), num_parallel_calls=2
    )
    mapped = np.stack(list(dataset.as_numpy_iterator()))
    np.testing.assert_array_equal(eager, mapped)


def test_exif_orientation_is_applied_the_same_way_eagerly_and_in_tf_data():
    # A portrait photo stored landscape with orientation 6 (rotate 90 clockwise to view).
    upright = photo(160, 120, seed=3)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(stored, "JPEG", quality=98, exif=exif.tobytes())
    reference = decode_image(encode(upright, "JPEG", quality=98), SIZE).numpy()
    eager = decode_image(rotated, SIZE).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(rotated).map(lambda b: decode_image(b, SIZE)))).numpy()
    np.testing.assert_array_equal(eager, mapped)
    assert np.abs(eager - reference).mean() < 4  # upright, up to JPEG differences
    assert np.abs(decode_image(encode(stored, "JPEG", quality=98), SIZE).numpy() - reference).mean() > 20


@pytest.mark.parametrize(
    "contents, words",
    [
        (b"", "."),
        (b"this is a text file, not an image", "."),
        (samples()["jpeg"][:200], "."),
    ],
)
def test_undecodable_bytes_raise_invalid_argument(contents, words):
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(contents, SIZE)


def test_tiff_is_refused_with_the_fix():
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)tiff"):
        decode_image(encode(photo(), "TIFF"), SIZE)


def test_pixel_cap_is_checked_before_decoding():
    contents = encode(photo(100, 100), "PNG")
    decode_image(contents, SIZE, max_pixels=10_000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="10000"):
        decode_image(contents, SIZE, max_pixels=9_999)


def test_load_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.jpg") as err:
        load_image(bad, SIZE)
    assert err.value.path == str(bad)
    assert "[[" not in str(err.value)  # no TF graph trace in a user-facing message


def test_read_image_bytes_refuses_devices_and_large_files(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(link)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(ImageError, match="cap"):
        read_image_bytes(big, max_bytes=1024)
    with pytest.raises(ImageError, match="cannot read"):
        read_image_bytes(tmp_path / "missing.jpg")


def test_the_real_photos_decode(realset):
    labels = pd.read_csv(realset / "labels.csv")
    for name in labels.file:
        image = load_image(realset / name, (384, 512)).numpy()
        assert image.shape == (384, 512, 3)
        assert 20 < image.mean() < 235 and image.std() > 5, name
