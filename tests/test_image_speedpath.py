"""decode_image's JPEG fast path: DCT-domain downscaling (decode_jpeg ratio), skipped resizes.

The reference for every expectation is computed another way: Pillow's draft mode (which
asks libjpeg for the same DCT scaling), or `tf.io.decode_jpeg` at an explicit ratio
followed by the antialiased resize.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kiqa.image import decode_image


def photo(height, width, seed=0):
    """Smooth gradient plus noise: texture at every scale, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / width, y * 255.0 / height, (x + y) * 127.0 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(array, exif_orientation=None, **kwargs):
    buffer = io.BytesIO()
    extra = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra["exif"] = exif.tobytes()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92, **extra, **kwargs)
    return buffer.getvalue()


def at_ratio(contents, ratio, size):
    """Decode at an explicit DCT ratio, then the antialiased resize (the expected path)."""
    image = tf.io.decode_jpeg(contents, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
    image = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return tf.clip_by_value(tf.round(image), 0, 255).numpy()


def pillow_draft(contents, size):
    image = Image.open(io.BytesIO(contents))
    image.draft("RGB", (size[1], size[0]))
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_exact_half_size_equals_pillow_draft_bit_for_bit():
    # KonIQ's case in miniature: 256x192 -> 128x96 is exactly ratio 2, no resize left.
    contents = jpeg(photo(96 * 2, 128 * 2))
    expected = pillow_draft(contents, (96, 128))
    assert expected.shape == (96, 128, 3)  # Pillow picked 1/2 scale too
    np.testing.assert_array_equal(decode_image(contents, (96, 128)).numpy(), expected)


def test_full_size_decode_equals_pillow_bit_for_bit():
    # Same size in and out: ratio 1, no resize, libjpeg's accurate integer DCT like Pillow.
    contents = jpeg(photo(48, 64, seed=1))
    expected = np.asarray(Image.open(io.BytesIO(contents)).convert("RGB"), dtype=np.float32)
    np.testing.assert_array_equal(decode_image(contents, (48, 64)).numpy(), expected)


@pytest.mark.parametrize(
    "source, size, ratio",
    [
        ((160, 200), (48, 64), 2),  # 1/4 would give 40x50, too small
        ((160, 200), (40, 50), 4),  # 1/4 is exactly the size; 1/8 (20x25) is too small
        ((161, 201), (41, 51), 4),  # libjpeg rounds up: ceil(161/4)=41, ceil(201/4)=51
        ((161, 201), (42, 51), 2),  # one row more than 1/4 gives
        ((256, 256), (32, 32), 8),
        ((60, 80), (96, 128), 1),  # upscaling decodes at full size
    ],
)
def test_largest_ratio_that_still_covers_the_size(source, size, ratio):
    contents = jpeg(photo(*source, seed=2))
    np.testing.assert_array_equal(decode_image(contents, size).numpy(), at_ratio(contents, ratio, size))


@pytest.mark.parametrize("orientation, size, ratio", [(6, (64, 32), 4), (6, (32, 64), 2), (1, (32, 64), 4)])
def test_ratio_is_chosen_on_the_upright_image(orientation, size, ratio):
    # Stored 128 high x 256 wide; orientation 6 turns it to 256 high x 128 wide. For 64x32
    # upright that allows 1/4 (stored 32x64); without the turn it would only allow 1/2.
    stored = photo(128, 256, seed=3)
    contents = jpeg(stored, exif_orientation=orientation)
    upright = tf.io.decode_jpeg(contents, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
    if orientation == 6:
        upright = tf.image.rot90(upright, k=3)  # 90 degrees clockwise
    expected = tf.image.resize(tf.cast(upright, tf.float32), size, antialias=True)
    expected = tf.clip_by_value(tf.round(expected), 0, 255).numpy()
    np.testing.assert_array_equal(decode_image(contents, size).numpy(), expected)


def test_grey_and_cmyk_jpegs_take_the_fast_path_as_rgb():
    rgb = photo(128, 160, seed=4)
    grey = jpeg(rgb[..., 0])
    image = decode_image(grey, (64, 80)).numpy()
    np.testing.assert_array_equal(image, at_ratio(grey, 2, (64, 80)))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    cmyk = buffer.getvalue()
    image = decode_image(cmyk, (64, 80)).numpy()
    np.testing.assert_array_equal(image, at_ratio(cmyk, 2, (64, 80)))
    assert image.std() > 10


def test_other_formats_keep_the_full_decode_and_resize():
    rgb = photo(128, 160, seed=5)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    expected = tf.image.resize(tf.constant(rgb, tf.float32), (64, 80), antialias=True)
    expected = tf.clip_by_value(tf.round(expected), 0, 255).numpy()
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), (64, 80)).numpy(), expected)


def test_every_ratio_agrees_eagerly_in_tf_data_and_in_a_signature():
    size = (40, 50)
    items = [jpeg(photo(h, w, seed=6)) for h, w in ((40, 50), (80, 100), (160, 200), (320, 400), (41, 49))]
    eager = np.stack([decode_image(c, size).numpy() for c in items])
    mapped = np.stack(list(
        tf.data.Dataset.from_tensor_slices(items).map(lambda c: decode_image(c, size), num_parallel_calls=2)
        .as_numpy_iterator()
    ))
    signature = tf.function(
        lambda batch: tf.map_fn(
            lambda c: decode_image(c, size), batch, fn_output_signature=tf.TensorSpec([*size, 3], tf.float32)
        ),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    np.testing.assert_array_equal(eager, mapped)
    np.testing.assert_array_equal(eager, signature(tf.constant(items)).numpy())


def test_pixel_cap_still_applies_before_a_scaled_decode():
    contents = jpeg(photo(160, 200, seed=7))
    with pytest.raises(tf.errors.InvalidArgumentError, match="32000"):
        decode_image(contents, (40, 50), max_pixels=31_999)
    dataset = tf.data.Dataset.from_tensors(contents).map(lambda c: decode_image(c, (40, 50), max_pixels=31_999))
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the cap"):
        next(iter(dataset))


def test_real_koniq_photos_match_pillow_draft_and_stay_close_to_a_full_resize(realset):
    # The documented quality cost of the DCT route on KonIQ's 1024x768 photos (ratio 2).
    photos = sorted((realset / "images").glob("koniq_*_1024.jpg"))
    assert photos, f"no 1024x768 KonIQ photos in {realset / 'images'}"
    differences = []
    for path in photos:
        contents = path.read_bytes()
        image = decode_image(contents, (384, 512)).numpy()
        np.testing.assert_array_equal(image, pillow_draft(contents, (384, 512)), err_msg=path.name)
        full = at_ratio(contents, 1, (384, 512))
        differences.append(np.abs(image - full).mean())
    # Documented in decode_image: 0.5-4.6 levels, mean 1.8.
    assert 0.2 < np.mean(differences) < 2.5 and max(differences) < 5.0, differences
