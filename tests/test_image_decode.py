"""The one image function, eagerly and inside tf.data (they must agree to the pixel)."""

import importlib
import io
import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from hostile_corpus import animated, claiming, gif_file, gif_frame_bomb, gif_image_block
from kiqa.errors import ImageError
from kiqa.image import decode_image, describe_decode_error, load_image, read_image_bytes

# The module that defines decode_image (kiqa.image, or kiqa.image.decode after the layout
# step), for its private size check.
image_module = importlib.import_module(decode_image.__module__)

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


# ----------------------------------------------------------------------------- frames, headers


def _outcomes(items, size=SIZE):
    """decode_image's outcome for each (name, bytes), eagerly and in one tf.data pass:
    per item [eager, mapped], each (pixels, None) or (None, message as users see it)."""

    def run(function):
        try:
            return function().numpy() if callable(function) else function, None
        except tf.errors.InvalidArgumentError as err:
            return None, describe_decode_error(err)

    names, contents = zip(*items)
    eager = [run(lambda c=c, n=n: decode_image(c, size, name=n)) for n, c in items]
    # One pass for all: a tf.data iterator goes on to the next element after an error.
    iterator = iter(tf.data.Dataset.from_tensor_slices((list(contents), list(names))).map(
        lambda b, n: decode_image(b, size, name=n)))
    mapped = [run(lambda: next(iterator)) for _ in items]
    return [list(pair) for pair in zip(eager, mapped)]


def _frames():
    return [Image.fromarray(a).quantize(64) for a in (photo(), 255 - photo(), photo()[::-1])]


def _png_pixels(array):
    return decode_image(encode(array, "PNG"), SIZE).numpy()


def test_an_animated_gif_gives_its_first_frame_only():
    first, second, third = _frames()
    first_pixels = _png_pixels(np.asarray(first.convert("RGB")))
    cases = {  # name -> (bytes, what its first frame decodes to)
        "bomb.gif": (gif_frame_bomb(1200, 900, 40), _png_pixels(np.full((90, 120, 3), (40, 128, 200), np.uint8))),
        "photo-then-bomb.gif": (gif_frame_bomb(1200, 900, 20, first=first), first_pixels),
        "cut-last-frame.gif": (animated([first, second, third], "GIF")[:-500], first_pixels),
        # Before DECODE_VERSION 3, TF padded the first frame to the later, larger one.
        "second-frame-larger.gif": (gif_file((160, 120), [gif_image_block(first), gif_image_block(
            Image.fromarray(photo(400, 300)).quantize(16))]), first_pixels),
    }
    results = _outcomes([(name, data) for name, (data, _) in cases.items()])
    for (name, (_, expected)), outcomes in zip(cases.items(), results):
        for pixels, message in outcomes:
            assert message is None, f"{name}: {message}"
            np.testing.assert_array_equal(pixels, expected, err_msg=name)


def test_animated_webp_is_refused_by_name_and_apng_gives_its_default_image():
    still, moved = Image.fromarray(photo()), Image.fromarray(255 - photo())
    items = [
        ("clip.webp", animated([still, moved], "WEBP", lossless=True)),
        ("clip-alpha.webp", animated([still.convert("RGBA"), moved.convert("RGBA")], "WEBP", quality=80)),
        ("clip.png", animated([still, moved], "PNG")),
    ]
    *webps, apng = _outcomes(items)
    for (name, _), outcomes in zip(items, webps):
        for pixels, message in outcomes:
            assert pixels is None
            assert message.startswith(f"{name}: image is an animated WebP;")
            assert "convert it to a still image" in message and "corrupt" not in message
    for pixels, message in apng:
        np.testing.assert_array_equal(pixels, _png_pixels(photo()))


_DISAGREEING = [  # (format, encoder options, size the header is made to claim, reason)
    ("JPEG", {}, (7999, 7999), r"JPEG header announces 7999x7999 pixels, which need at least \d+ bytes"),
    ("JPEG", dict(progressive=True), (4000, 3000), r"JPEG header announces 4000x3000 pixels, which need"),
    ("PNG", {}, (5000, 5000), r"Invalid PNG data"),
    ("PNG", {}, (64, 48), r"Invalid PNG data"),
    ("GIF", {}, (5000, 5000), r"Invalid GIF data"),
    ("BMP", {}, (5000, 5000), r"Input size should match"),
    ("BMP", {}, (64, 48), r"Input size should match"),
    ("WEBP", dict(lossless=True), (5000, 5000), r"Failed to decode WebP"),
    ("WEBP", dict(quality=80), (5000, 5000), r"Failed to decode WebP"),
]


def test_a_header_that_disagrees_with_the_data_is_refused():
    items = [(f"photos/{i}.{fmt.lower()}", claiming(encode(photo(), fmt, **options), *size))
             for i, (fmt, options, size, _) in enumerate(_DISAGREEING)]
    for (name, _), (fmt, _, size, reason), outcomes in zip(items, _DISAGREEING, _outcomes(items)):
        for pixels, message in outcomes:
            assert pixels is None, f"{fmt} claiming {size} was decoded"
            assert message.startswith(f"{name}: ") or not reason.startswith("JPEG"), message
            assert re.search(reason, message), message
            assert "name:" not in message and "[[" not in message


def test_a_decoded_size_other_than_the_header_is_refused():
    # No TF 2.21 decoder was found to do this on any file (they decode the header's size
    # or fail); the check keeps the pixel cap and the JPEG scale honest if one does.
    image = tf.zeros([30, 40, 3], tf.uint8)
    same = image_module._check_decoded_shape(image, tf.constant([30, 40], tf.int64), 4, "a.gif")
    assert same.shape == (30, 40, 3)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        image_module._check_decoded_shape(image, tf.constant([300, 400], tf.int64), 4, "a.gif")
    assert caught.value.message.startswith(
        "a.gif: image header announces 400x300 pixels, but its data decodes to 40x30: the header was altered"
    )
    scaled = tf.function(lambda: image_module._check_decoded_shape(
        image, tf.constant([300, 400], tf.int64), 3, tf.constant("image_bytes[2]")))  # ratio 8
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        scaled()
    text = describe_decode_error(caught.value)
    assert text.startswith("image_bytes[2]: image header announces 400x300 pixels, but its data decodes to "
                           "40x30 at 1/8 scale, where 50x38 was expected")
    ok = tf.function(lambda: image_module._check_decoded_shape(image, tf.constant([240, 320], tf.int64), 3, "b"))
    assert ok().shape == (30, 40, 3)


def test_describe_decode_error_keeps_only_the_decoders_words():
    # As a SavedModel function raises it (no Python stack), and as an eager op does.
    graph = (
        "Graph execution error:\n\nDetected at node map/while/DecodeJpeg defined at (most recent call last):\n"
        "<stack traces unavailable>\njpeg::Uncompress failed. Invalid JPEG data or crop window.\n"
        "\t [[{{node map/while/DecodeJpeg}}]] [Op:__inference_signature_wrapper_91450]"
    )
    eager = "{{function_node __wrapped__DecodeImage_device_/job:localhost}} Invalid PNG data, size 23908 [Op:DecodeImage] name: "
    assert describe_decode_error(tf.errors.InvalidArgumentError(None, None, graph)) == (
        "jpeg::Uncompress failed. Invalid JPEG data or crop window."
    )
    assert describe_decode_error(tf.errors.InvalidArgumentError(None, None, eager)) == "Invalid PNG data, size 23908"
