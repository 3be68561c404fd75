"""Tests for kiqa.image.header: header sniffing, size, EXIF orientation, eagerly and in tf.data.

Images are written by Pillow into tmp_path; hostile files are crafted byte by byte and are
never handed to a decoder (a 30000x30000 header would make TF allocate 2.7 GB).
"""

import functools
import io
import zlib

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from hostile_corpus import (
    animated, claiming, gif_blocks, gif_comment, gif_delay, gif_file, gif_frame_bomb, gif_image_block,
    jpeg_with_segments, png_with_text_chunks, scan_bomb,
)
from kiqa.image import header as imageinfo
from kiqa.errors import ConfigError

HEIGHT, WIDTH = 24, 40  # not square, so a missed or wrong rotation changes the shape
EXIF_ORIENTATION = 0x0112


def _pattern(height=HEIGHT, width=WIDTH):
    """Smooth and asymmetric: red grows left to right, green top to bottom."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (height + width - 2)],
        axis=-1,
    ).astype(np.uint8)


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif(orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif


def _segment(marker, payload):
    """A JPEG marker segment: FF, marker, big-endian length (itself included), payload."""
    return b"\xff" + bytes([marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _chunk(kind, data):
    """A PNG chunk with its CRC."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _tiff_orientation_block(orientation, big_endian):
    """A minimal EXIF TIFF block: header, IFD0 with one SHORT orientation entry."""
    order = "big" if big_endian else "little"
    value = orientation.to_bytes(2, order) + b"\x00\x00"
    entry = (
        EXIF_ORIENTATION.to_bytes(2, order) + (3).to_bytes(2, order)
        + (1).to_bytes(4, order) + value
    )
    return (
        (b"MM" if big_endian else b"II") + (42).to_bytes(2, order) + (8).to_bytes(4, order)
        + (1).to_bytes(2, order) + entry + (0).to_bytes(4, order)
    )


def _with_app1_exif(jpeg, tiff_block):
    """The JPEG with an APP1 Exif segment inserted right after SOI."""
    return jpeg[:2] + _segment(0xE1, b"Exif\x00\x00" + tiff_block) + jpeg[2:]


# ----------------------------------------------------------------------------- GIF assembly


def _gif_frame(pixels, left, top):
    """One self-contained GIF image block (local colour table) placed at (left, top)."""
    image = bytearray(gif_image_block(Image.fromarray(pixels)))
    image[1:5] = left.to_bytes(2, "little") + top.to_bytes(2, "little")
    return bytes(image)


def _gif(screen_width, screen_height, frames):
    """A GIF with a chosen logical screen around frames [(pixels, left, top), ...]."""
    return gif_file((screen_width, screen_height), [_gif_frame(*f) for f in frames])


# ----------------------------------------------------------------------------- samples


def _bmp_top_down(pixels):
    data = bytearray(_encode(Image.fromarray(pixels), "BMP"))
    height = int.from_bytes(data[22:26], "little", signed=True)
    data[22:26] = (-height).to_bytes(4, "little", signed=True)
    return bytes(data)


# name -> (format, bytes): every image TF decodes, at HEIGHT x WIDTH unless noted.
def _samples():
    rgb = Image.fromarray(_pattern())
    grey = rgb.convert("L")
    small = _pattern(5, 7)
    return {
        "jpeg": ("jpeg", _encode(rgb, "JPEG", quality=90)),
        "jpeg_grey": ("jpeg", _encode(grey, "JPEG")),
        "jpeg_progressive": ("jpeg", _encode(rgb, "JPEG", progressive=True)),
        "jpeg_exif": ("jpeg", _encode(rgb, "JPEG", exif=_exif(6))),
        "png": ("png", _encode(rgb, "PNG")),
        "png_grey": ("png", _encode(grey, "PNG")),
        "png_rgba": ("png", _encode(rgb.convert("RGBA"), "PNG")),
        "png_16bit": ("png", _encode(Image.fromarray(_pattern()[..., 0] * np.uint16(257)), "PNG")),
        "gif": ("gif", _encode(rgb, "GIF")),
        "gif_animated": ("gif", _encode(
            rgb, "GIF", save_all=True, append_images=[Image.fromarray(_pattern()[::-1])], loop=0
        )),
        # TF decodes a GIF to its largest frame (kiqa gives it only the first), whatever
        # the logical screen says.
        "gif_screen_larger": ("gif", _gif(WIDTH + 60, HEIGHT + 50, [(_pattern(), 0, 0)])),
        "gif_screen_smaller": ("gif", _gif(10, 8, [(_pattern(), 0, 0)])),
        "gif_first_frame_larger": ("gif", _gif(WIDTH, HEIGHT, [(_pattern(), 0, 0), (small, 1, 1)])),
        "bmp": ("bmp", _encode(rgb, "BMP")),
        "bmp_grey": ("bmp", _encode(grey, "BMP")),
        "bmp_top_down": ("bmp", _bmp_top_down(_pattern())),
        "webp_lossy": ("webp", _encode(rgb, "WEBP", quality=80)),
        "webp_lossless": ("webp", _encode(rgb, "WEBP", lossless=True)),
        "webp_extended": ("webp", _encode(rgb, "WEBP", exif=_exif(3))),
    }


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """name -> (format, path) of Pillow-written files in a temporary folder."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for name, (fmt, data) in _samples().items():
        path = folder / f"{name}.{fmt}"
        path.write_bytes(data)
        files[name] = (fmt, path)
    return files


def _hostile_jpeg(height=30000, width=30000):
    """~630 bytes of well-formed JPEG headers whose frame header claims height x width."""
    components = b"\x03" + b"\x01\x22\x00" + b"\x02\x11\x01" + b"\x03\x11\x01"
    size = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    sof = _segment(0xC0, b"\x08" + size + components)
    dqt = _segment(0xDB, b"\x00" + bytes(range(1, 65))) + _segment(0xDB, b"\x01" + bytes(64 * [99]))
    counts = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    dht = _segment(0xC4, b"\x00" + counts + bytes(range(12)))
    sos = _segment(0xDA, b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00")
    jfif = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    scan = bytes(range(256)) + bytes(110)  # stands in for entropy-coded data
    return b"\xff\xd8" + jfif + dqt + sof + dht + sos + scan + b"\xff\xd9"


def _hostile_png(height=20000, width=20000):
    """A PNG whose IHDR claims height x width, with one tiny IDAT: 70-odd bytes."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 61)) + _chunk(b"IEND", b"")
    )


def _garbage(size=512, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False)


# ----------------------------------------------------------------------------- format and size


@pytest.mark.parametrize("name", sorted(_samples()))
def test_header_shape_is_the_size_tf_decodes(sample_files, name):
    fmt, path = sample_files[name]
    data = path.read_bytes()
    expected = (HEIGHT, WIDTH)
    assert imageinfo.image_format(data).numpy() == fmt.encode()
    assert tuple(imageinfo.header_shape(data).numpy()) == expected
    assert tuple(_decode(imageinfo.first_image(data)).shape[:2]) == expected


def test_header_shape_agrees_with_pillow_and_tf_jpeg_parser(sample_files):
    for name in ("jpeg", "jpeg_grey", "jpeg_progressive", "png", "bmp", "webp_lossy"):
        data = sample_files[name][1].read_bytes()
        width, height = Image.open(io.BytesIO(data)).size
        assert tuple(imageinfo.header_shape(data).numpy()) == (height, width), name
    jpeg = sample_files["jpeg"][1].read_bytes()
    assert list(imageinfo.header_shape(jpeg).numpy()) == list(tf.image.extract_jpeg_shape(jpeg)[:2])


def test_other_sizes_and_aspect_ratios():
    for height, width in [(1, 1), (3, 200), (97, 5)]:
        image = Image.fromarray(_pattern(max(height, 2), max(width, 2))[:height, :width])
        for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
            data = _encode(image, fmt)
            assert tuple(imageinfo.header_shape(data).numpy()) == (height, width), fmt


def test_tiff_is_named_but_its_size_is_not_read(tmp_path):
    path = tmp_path / "photo.tiff"
    Image.fromarray(_pattern()).save(path)
    data = path.read_bytes()
    assert imageinfo.image_format(data).numpy() == b"tiff"
    assert list(imageinfo.header_shape(data).numpy()) == [-1, -1]


def test_jpeg_xl_is_recognised_by_its_signature():
    assert imageinfo.image_format(b"\xff\x0a" + bytes(30)).numpy() == b"jxl"
    container = b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(30)
    assert imageinfo.image_format(container).numpy() == b"jxl"
    assert list(imageinfo.header_shape(container).numpy()) == [-1, -1]


def test_jpeg_walk_steps_over_fill_bytes_and_stray_bytes(sample_files):
    jpeg = sample_files["jpeg"][1].read_bytes()
    # Fill bytes before a marker and junk between segments: libjpeg accepts both.
    first_segment_end = 4 + int.from_bytes(jpeg[4:6], "big")
    variants = [
        jpeg[:2] + b"\xff\xff\xff" + jpeg[2:],
        jpeg[:first_segment_end] + b"\x00junk" + jpeg[first_segment_end:],
    ]
    for data in variants:
        assert tuple(_decode(data).shape[:2]) == (HEIGHT, WIDTH)
        assert tuple(imageinfo.header_shape(data).numpy()) == (HEIGHT, WIDTH)


def test_bmp_with_os2_core_header_is_unknown():
    # 12-byte BITMAPCOREHEADER with 16-bit sizes: TF reads 32-bit fields there.
    header = b"BM" + (26 + 3).to_bytes(4, "little") + bytes(4) + (26).to_bytes(4, "little")
    core = (12).to_bytes(4, "little") + (1).to_bytes(2, "little") * 2 + b"\x01\x00\x18\x00"
    assert list(imageinfo.header_shape(header + core + b"\x00\x00\xff").numpy()) == [-1, -1]


# ----------------------------------------------------------------------------- eager == tf.data


def _all_bytes(sample_files):
    items = [path.read_bytes() for _, path in sample_files.values()]
    items += [
        _hostile_jpeg(), _hostile_png(), b"", _garbage(), _garbage(3, seed=1),
        sample_files["jpeg_exif"][1].read_bytes()[:300], _gif(30000, 30000, [(_pattern(), 0, 0)]),
    ]
    jpeg = sample_files["jpeg"][1].read_bytes()
    items += [
        _with_app1_exif(jpeg, _tiff_orientation_block(o, big_endian=o % 2 == 0))
        for o in range(1, 9)
    ]
    return items


def test_header_functions_give_the_same_results_in_tf_data(sample_files):
    items = _all_bytes(sample_files)
    eager = [
        (imageinfo.image_format(d).numpy(), tuple(imageinfo.header_shape(d).numpy()),
         int(imageinfo.exif_orientation(d)))
        for d in items
    ]
    dataset = tf.data.Dataset.from_tensor_slices(items).map(
        lambda d: (
            imageinfo.image_format(d), imageinfo.header_shape(d), imageinfo.exif_orientation(d)
        )
    )
    in_graph = [(f, tuple(s), int(o)) for f, s, o in dataset.as_numpy_iterator()]
    assert in_graph == eager
    # The comparison is not vacuous: real sizes, unknowns and all eight orientations occur.
    assert (HEIGHT, WIDTH) in {s for _, s, _ in eager} and (-1, -1) in {s for _, s, _ in eager}
    assert {o for _, _, o in eager} == set(range(1, 9))


def test_header_functions_work_inside_tf_function():
    data = _encode(Image.fromarray(_pattern()), "PNG", exif=_exif(8))

    @tf.function
    def facts(contents):
        return imageinfo.check_header(contents, 10_000), imageinfo.exif_orientation(contents)

    shape, orientation = facts(tf.constant(data))
    assert tuple(shape.numpy()) == (HEIGHT, WIDTH) and int(orientation) == 8


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_reads_the_written_tag(tmp_path, fmt, orientation):
    path = tmp_path / f"oriented.{fmt.lower()}"
    Image.fromarray(_pattern()).save(path, fmt, exif=_exif(orientation))
    assert int(imageinfo.exif_orientation(path.read_bytes())) == orientation


@pytest.mark.parametrize("big_endian", [False, True], ids=["II", "MM"])
def test_exif_orientation_reads_both_byte_orders(sample_files, big_endian):
    jpeg = sample_files["jpeg"][1].read_bytes()
    for orientation in (3, 6, 8):
        data = _with_app1_exif(jpeg, _tiff_orientation_block(orientation, big_endian))
        assert int(imageinfo.exif_orientation(data)) == orientation
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size[0] == (
            HEIGHT if orientation in (6, 8) else WIDTH
        )


def test_exif_orientation_defaults_to_upright(sample_files):
    jpeg = sample_files["jpeg"][1].read_bytes()
    good = _tiff_orientation_block(6, big_endian=False)
    broken = {
        "no exif": jpeg,
        "value 0": _with_app1_exif(jpeg, _tiff_orientation_block(0, False)),
        "value 9": _with_app1_exif(jpeg, _tiff_orientation_block(9, False)),
        "IFD offset past the segment": _with_app1_exif(
            jpeg, good[:4] + b"\xff\xff\x00\x00" + good[8:]
        ),
        "bad byte order mark": _with_app1_exif(jpeg, b"XX" + good[2:]),
        "not 42": _with_app1_exif(jpeg, good[:2] + b"\x2b\x00" + good[4:]),
        "entry cut off by the segment end": _with_app1_exif(jpeg, good[:-10]),
        "exif after the image data": jpeg[:-2] + _segment(0xE1, b"Exif\x00\x00" + good) + jpeg[-2:],
        "gif": sample_files["gif"][1].read_bytes(),
        "bmp": sample_files["bmp"][1].read_bytes(),
        "garbage": _garbage(),
    }
    assert int(imageinfo.exif_orientation(_with_app1_exif(jpeg, good))) == 6  # the control
    for case, data in broken.items():
        assert int(imageinfo.exif_orientation(data)) == 1, case


# ----------------------------------------------------------------------------- apply_orientation


def _oriented(fmt, orientation, **options):
    return _encode(Image.fromarray(_pattern()), fmt, exif=_exif(orientation), **options)


def _pil_upright(data):
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _tf_upright(data):
    return imageinfo.apply_orientation(_decode(data), imageinfo.exif_orientation(data)).numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_equals_pil_exif_transpose_on_png(orientation):
    data = _oriented("PNG", orientation)
    expected = _pil_upright(data)
    assert expected.shape[:2] == ((WIDTH, HEIGHT) if orientation >= 5 else (HEIGHT, WIDTH))
    np.testing.assert_array_equal(_tf_upright(data), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_equals_pil_exif_transpose_on_jpeg(orientation):
    # Both decode the same JPEG bytes; TF's default IDCT (IFAST) differs from Pillow's by a
    # few levels, while a wrong transform would differ by up to 255.
    data = _oriented("JPEG", orientation, quality=95)
    expected = _pil_upright(data).astype(int)
    actual = _tf_upright(data).astype(int)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 8


def test_apply_orientation_in_tf_data_with_unknown_shapes():
    items = [_oriented("PNG", o) for o in range(1, 9)]
    dataset = tf.data.Dataset.from_tensor_slices(items).map(
        lambda d: imageinfo.apply_orientation(
            tf.io.decode_png(d, channels=3), imageinfo.exif_orientation(d)
        )
    )
    assert dataset.element_spec.shape.as_list() == [None, None, 3]
    for data, image in zip(items, dataset.as_numpy_iterator()):
        np.testing.assert_array_equal(image, _pil_upright(data))


def test_apply_orientation_with_a_static_non_square_shape_in_a_graph():
    image = _pattern()

    static = [tf.TensorSpec([HEIGHT, WIDTH, 3], tf.uint8), tf.TensorSpec([], tf.int32)]

    @tf.function(input_signature=static)
    def orient(pixels, orientation):
        return imageinfo.apply_orientation(pixels, orientation)

    for orientation in range(1, 9):
        eager = imageinfo.apply_orientation(image, orientation).numpy()
        np.testing.assert_array_equal(orient(image, orientation).numpy(), eager)
    # Values out of 1..8 leave the image alone, like a missing tag.
    for orientation in (0, 9, -3):
        np.testing.assert_array_equal(orient(image, orientation).numpy(), image)


# ----------------------------------------------------------------------------- hostile input


def test_hostile_jpeg_reports_the_claimed_size_without_decoding():
    data = _hostile_jpeg()
    assert 550 <= len(data) <= 700
    assert imageinfo.image_format(data).numpy() == b"jpeg"
    assert list(imageinfo.header_shape(data).numpy()) == [30000, 30000]
    # TF's own header parser agrees; it reads headers only, like header_shape.
    assert list(tf.image.extract_jpeg_shape(data).numpy()) == [30000, 30000, 3]


def test_hostile_png_reports_the_claimed_size_without_decoding():
    data = _hostile_png()
    assert len(data) < 100
    assert list(imageinfo.header_shape(data).numpy()) == [20000, 20000]


def test_png_without_ihdr_first_is_unknown():
    data = bytearray(_hostile_png(height=30, width=40))
    data[12:16] = b"IHDx"
    assert list(imageinfo.header_shape(bytes(data)).numpy()) == [-1, -1]


def test_gif_logical_screen_does_not_count():
    # A 30000x30000 screen around a 24x40 frame decodes to 24x40 in TF: no false alarm.
    data = _gif(30000, 30000, [(_pattern(), 0, 0)])
    assert tuple(_decode(data).shape[:2]) == (HEIGHT, WIDTH)
    assert tuple(imageinfo.check_header(data, HEIGHT * WIDTH).numpy()) == (HEIGHT, WIDTH)


@pytest.mark.parametrize("name", ["jpeg_exif", "png", "gif_animated", "bmp", "webp_extended"])
def test_truncated_files_give_unknown_or_the_true_size(sample_files, name):
    data = sample_files[name][1].read_bytes()
    lengths = sorted(set(range(0, 64)) | set(range(64, len(data), max(1, len(data) // 40))))
    for length in lengths:
        prefix = data[:length]
        shape = tuple(imageinfo.header_shape(prefix).numpy())
        assert shape in {(-1, -1), (HEIGHT, WIDTH)}, length
        assert int(imageinfo.exif_orientation(prefix)) in {1, 6, 3}, length


def test_empty_and_garbage_bytes():
    short_jpeg, zeros_jpeg = b"\xff\xd8\xff", b"\xff\xd8\xff" + bytes(5000)
    for data in (b"", b"\x00", _garbage(), _garbage(7, seed=3), short_jpeg, zeros_jpeg):
        assert list(imageinfo.header_shape(data).numpy()) == [-1, -1]
        assert int(imageinfo.exif_orientation(data)) == 1
    assert imageinfo.image_format(b"").numpy() == b"unknown"
    assert imageinfo.image_format(_garbage()).numpy() == b"unknown"


def test_jpeg_with_endless_fill_bytes_gives_up_and_stays_unknown():
    # The walk is bounded by bytes: _MAX_JPEG_STEPS windows of fill bytes, then it stops.
    fill = imageinfo._MAX_JPEG_STEPS * imageinfo._JPEG_WINDOW
    data = jpeg_with_segments(_hostile_jpeg(), fill=fill)
    assert list(imageinfo.header_shape(data).numpy()) == [-1, -1]
    with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG header is unreadable"):
        imageinfo.check_header(data, 64_000_000)


@pytest.mark.parametrize("comments, fill", [(1100, 0), (20000, 0), (0, 60000), (3000, 20000)])
def test_valid_jpegs_with_many_segments_or_fill_bytes_are_read(comments, fill):
    # Issue 24, 7a: more than 1,024 segments before the frame header was "unreadable".
    original = _encode(Image.fromarray(_pattern()), "JPEG", quality=95, exif=_exif(6).tobytes())
    data = jpeg_with_segments(original, comments=comments, fill=fill)
    assert tuple(imageinfo.check_header(data, 64_000_000).numpy()) == (HEIGHT, WIDTH)
    assert int(imageinfo.exif_orientation(data)) == 6
    np.testing.assert_array_equal(_decode(data).numpy(), _decode(original).numpy())  # TF agrees


def test_the_walks_path_end_is_the_same_hop_by_hop_and_by_pointer_doubling():
    # _path_end follows a window's path hop by hop and squares the jump table only when
    # the path is longer than _JPEG_HOPS: on paths of every length around that switch,
    # and on long ones, the stop must be the one a plain walk reaches.
    rng = np.random.default_rng(7)
    window = imageinfo._JPEG_WINDOW
    for hops in [0, 1, imageinfo._JPEG_HOPS - 1, imageinfo._JPEG_HOPS, imageinfo._JPEG_HOPS + 1, 300, 4000]:
        jump = np.arange(window, dtype=np.int32)  # every offset a stop ...
        path = np.sort(rng.choice(np.arange(1, window), size=hops, replace=False))
        stops = np.concatenate([[0], path])
        jump[stops[:-1]] = stops[1:]  # ... except those on the path, which go on
        others = np.setdiff1d(np.arange(window), stops)
        off_path = rng.choice(others, size=min(200, len(others)), replace=False)
        jump[off_path] = np.minimum(off_path + rng.integers(1, 50, size=len(off_path)), window - 1)
        assert int(imageinfo._path_end(tf.constant(jump))) == stops[-1], hops


@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 2])
def test_jpeg_facts_are_the_same_around_the_walks_hop_limit(extra):
    # Empty comment segments push the frame header past _JPEG_HOPS hops into the
    # first window; size, orientation and data facts stay those of the original.
    original = _encode(Image.fromarray(_pattern()), "JPEG", quality=95, exif=_exif(6).tobytes())
    data = jpeg_with_segments(original, comments=imageinfo._JPEG_HOPS + extra)
    assert tuple(imageinfo.check_header(data, 64_000_000).numpy()) == (HEIGHT, WIDTH)
    assert int(imageinfo.exif_orientation(data)) == 6
    np.testing.assert_array_equal(imageinfo.data_facts(data).numpy(), imageinfo.data_facts(original).numpy())


def test_jpeg_walk_still_refuses_garbage_between_segments():
    # Stray bytes are stepped over as libjpeg does, but a segment length that runs past
    # the end, or a file that is all junk after SOI, finds no frame header.
    jpeg = _hostile_jpeg()
    lying_length = jpeg[:2] + b"\xff\xfe\xff\xf0" + jpeg[2:]  # a comment longer than the file
    for data in (lying_length, b"\xff\xd8" + _garbage(50_000, seed=5).replace(b"\xff", b"\x00")):
        assert list(imageinfo.header_shape(data).numpy()) == [-1, -1]


# ----------------------------------------------------------------------------- decode cost


def _progressive(size=(64, 48)):
    return _encode(Image.new("RGB", size, (90, 140, 60)), "JPEG", quality=90, progressive=True)


def test_progressive_jpeg_scans_are_counted():
    data = _progressive()
    assert imageinfo.data_facts(data).numpy()[3] == 10  # libjpeg's progressive script
    assert imageinfo.data_facts(scan_bomb(data, 5)).numpy()[3] == 15
    grey = _encode(Image.new("L", (64, 48), 90), "JPEG", progressive=True)
    assert imageinfo.data_facts(grey).numpy()[3] == 6


def test_scans_of_a_single_scan_baseline_jpeg_are_not_searched():
    # libjpeg stops at the second SOS of a single-scan sequential JPEG with an error, at
    # no cost: its coded data need not be searched, and it is left to the decoder.
    baseline = _encode(Image.new("RGB", (64, 48), (90, 140, 60)), "JPEG")
    assert imageinfo.data_facts(scan_bomb(baseline, 500)).numpy()[3] == 1
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(scan_bomb(baseline, 500))


def test_jpeg_with_too_many_scans_is_refused_by_name_and_count():
    limit = imageinfo.MAX_JPEG_SCANS
    at_limit = scan_bomb(_progressive(), limit - 10)
    assert tuple(imageinfo.check_header(at_limit, 64_000_000).numpy()) == (48, 64)
    message = _check_error(scan_bomb(_progressive(), limit - 9), name="bomb.jpg")
    assert message.startswith(f"bomb.jpg: JPEG has {limit + 1} scans, over the limit of {limit} ")
    assert "re-encode it" in message


def test_png_text_chunks_are_counted_before_and_after_the_image_data():
    png = _encode(Image.fromarray(_pattern()), "PNG")
    assert imageinfo.data_facts(png).numpy()[4] == 0
    for kind in (b"zTXt", b"iTXt"):
        for after in (False, True):
            assert imageinfo.data_facts(png_with_text_chunks(png, 7, kind=kind, after_image=after)).numpy()[4] == 7
    # Plain tEXt is not inflated (its cost is its size): not counted.
    assert imageinfo.data_facts(png_with_text_chunks(png, 300, kind=b"tEXt")).numpy()[4] == 0


def test_png_with_too_many_text_chunks_is_refused_by_name_and_count():
    limit = imageinfo.MAX_PNG_TEXT_CHUNKS
    png = _encode(Image.fromarray(_pattern()), "PNG")
    at_limit = png_with_text_chunks(png, limit)
    assert tuple(imageinfo.check_header(at_limit, 64_000_000).numpy()) == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(_decode(at_limit).numpy(), _decode(png).numpy())
    message = _check_error(png_with_text_chunks(png, limit + 1, after_image=True), name="notes.png")
    assert message.startswith(f"notes.png: PNG has {limit + 1} zTXt/iTXt text chunks, over the limit of {limit}")
    assert "strip its metadata" in message


def test_decode_cost_refusals_hold_in_tf_data():
    bombs = [scan_bomb(_progressive(), 200), png_with_text_chunks(_encode(Image.fromarray(_pattern()), "PNG"), 30)]
    for data, reason in zip(bombs, ["JPEG has 210 scans", "PNG has 30 zTXt/iTXt"]):
        dataset = tf.data.Dataset.from_tensors(data).map(lambda d: imageinfo.check_header(d, 64_000_000))
        with pytest.raises(tf.errors.InvalidArgumentError, match=reason):
            list(dataset)


# ----------------------------------------------------------------------------- GIF frames


def _frames(count=3, height=HEIGHT, width=WIDTH):
    """Distinct palette images (each frame a different turn of the pattern)."""
    pattern = _pattern(height, width)
    turns = [pattern, pattern[::-1], pattern[:, ::-1], 255 - pattern]
    return [Image.fromarray(turns[i % 4]).quantize(32) for i in range(count)]


def _one_frame(data):
    """What TF decodes from `first_image(data)`: all its frames (must be one)."""
    return tf.io.decode_gif(imageinfo.first_image(data)).numpy()


def _hostile_gifs():
    """name -> (GIF bytes, the first image block alone as a GIF, first image's (h, w))."""
    first, second, third = _frames()
    block = gif_image_block(first)
    alone = gif_file((WIDTH, HEIGHT), [block])
    many = animated([first, second, third] * 10, "GIF")
    bomb = gif_frame_bomb(300, 200, 20, first=first)
    return {
        "thirty_frames": (many, animated([first], "GIF"), (HEIGHT, WIDTH)),
        "local_tables_and_extensions": (bomb, alone, (HEIGHT, WIDTH)),
        "truncated_last_frame": (many[:-100], animated([first], "GIF"), (HEIGHT, WIDTH)),
        "no_trailer": (many[:-1], animated([first], "GIF"), (HEIGHT, WIDTH)),
        "frame_larger_than_screen": (
            gif_file((10, 8), [gif_comment(b"hi"), block, gif_delay(), gif_image_block(second)]),
            alone, (HEIGHT, WIDTH),
        ),
        "second_frame_larger": (
            gif_file((7, 5), [gif_image_block(Image.fromarray(_pattern(5, 7)).quantize(8)), block]),
            gif_file((7, 5), [gif_image_block(Image.fromarray(_pattern(5, 7)).quantize(8))]), (5, 7),
        ),
        "global_table_then_local_tables": (
            gif_blocks(_encode(first, "GIF"))[0] + gif_image_block(first, local_table=False)
            + gif_delay() + gif_image_block(second) + b";",
            animated([first], "GIF"), (HEIGHT, WIDTH),
        ),
    }


@pytest.mark.parametrize("name", sorted(_hostile_gifs()))
def test_first_image_of_a_gif_is_its_first_frame_alone(name):
    data, alone, shape = _hostile_gifs()[name]
    frames = _one_frame(data)
    assert frames.shape == (1, *shape, 3)
    assert tuple(imageinfo.header_shape(data).numpy()) == shape
    if alone is not None:
        np.testing.assert_array_equal(frames[0], tf.io.decode_gif(alone).numpy()[0])
    assert imageinfo.first_image(data).numpy().endswith(b";")


def test_first_image_of_a_gif_matches_pillow():
    first, second, third = _frames()
    data = animated([first, second, third], "GIF")
    frame = _one_frame(data)[0]
    np.testing.assert_array_equal(frame, np.asarray(first.convert("RGB")))
    assert not np.array_equal(frame, np.asarray(second.convert("RGB")))


def test_first_image_stops_the_walk_after_the_first_frame():
    # 2000 frames of 200x300 (120 MP in all): the walk reads only the first, so this
    # costs the same as a one-frame GIF, and what follows it is never looked at.
    data = gif_frame_bomb(300, 200, 2000)
    cut = imageinfo.first_image(data).numpy()
    assert len(cut) < len(data) / 1000
    header, blocks = gif_blocks(cut)
    assert [b[0] for b in blocks] == [0x21, 0x2C]  # its delay, its image: nothing more
    assert tuple(imageinfo.check_header(data, 200 * 300).numpy()) == (200, 300)


@pytest.mark.parametrize("cut", ["no_image", "trailer_only", "inside_first_image", "after_descriptor"])
def test_gif_without_a_complete_first_image_is_unknown(cut):
    whole = animated(_frames(2), "GIF")
    header, blocks = gif_blocks(whole)
    image = header + b"".join(blocks[: next(i for i, b in enumerate(blocks) if b[0] == 0x2C) + 1])
    data = {
        "no_image": gif_file((WIDTH, HEIGHT), [gif_comment(b"no frames"), gif_delay()]),
        "trailer_only": header + b";",
        "inside_first_image": image[:-40],
        "after_descriptor": image[: len(header) + 11],
    }[cut]
    assert list(imageinfo.header_shape(data).numpy()) == [-1, -1]
    assert imageinfo.first_image(data).numpy() == data  # left for check_header to refuse
    assert "GIF header is unreadable" in _check_error(data)


def test_first_image_leaves_other_formats_alone(sample_files):
    for name in ("jpeg", "png", "bmp", "webp_extended"):
        data = sample_files[name][1].read_bytes()
        assert imageinfo.first_image(data).numpy() == data
    assert imageinfo.first_image(b"").numpy() == b""


def test_first_image_inside_tf_data():
    data = [animated(_frames(3), "GIF"), gif_frame_bomb(300, 200, 5), _garbage()]
    dataset = tf.data.Dataset.from_tensor_slices(data).map(imageinfo.first_image)
    assert list(dataset.as_numpy_iterator()) == [imageinfo.first_image(d).numpy() for d in data]


# ----------------------------------------------------------------------------- data facts


def test_animated_webp_is_flagged_and_refused_by_name(sample_files):
    moving = [
        animated([Image.fromarray(_pattern()), Image.fromarray(255 - _pattern())], "WEBP", lossless=True),
        animated([Image.fromarray(f).convert("RGBA") for f in (_pattern(), _pattern()[::-1])], "WEBP", quality=70),
    ]
    for data in moving:
        assert imageinfo.data_facts(data).numpy()[0] == 1
        message = _check_error(data, name="clip.webp")
        assert message.startswith("clip.webp: image is an animated WebP")
        assert "convert it to a still image" in message and "corrupt" not in message
    for name in ("webp_lossy", "webp_lossless", "webp_extended", "gif_animated", "png"):
        assert imageinfo.data_facts(sample_files[name][1].read_bytes()).numpy()[0] == 0, name


def _flat_jpeg(size, mode="RGB", **options):
    return _encode(Image.new(mode, size, 128 if mode == "L" else (128, 128, 128)), "JPEG", **options)


@pytest.mark.parametrize("options", [
    dict(optimize=True), dict(optimize=True, subsampling=0), dict(optimize=True, progressive=True),
    dict(mode="L", optimize=True), dict(quality=20), dict(optimize=True, size=(1001, 777)),
], ids=["baseline-420", "baseline-444", "progressive", "grey", "standard-tables", "odd-size"])
def test_jpeg_data_bound_holds_for_the_most_compressible_jpegs(options):
    # A flat grey image with optimised Huffman tables codes every block in 2 bits: the
    # fewest a baseline JPEG can use. The bound must hold for it, and be close.
    size = options.pop("size", (1024, 768))
    data = _flat_jpeg(size, **options)
    _, needed, available, _, _ = imageinfo.data_facts(data).numpy()
    assert 0 < needed <= available
    if options == dict(optimize=True):
        assert needed > 0.95 * available  # tight: within 5% of the real data
    assert tuple(imageinfo.check_header(data, 64_000_000).numpy()) == size[::-1]


def test_jpeg_data_bound_holds_for_real_photos(realset):
    photos = sorted((realset / "images").glob("*.jpg"))
    assert photos
    for path in photos:
        _, needed, available, _, _ = imageinfo.data_facts(path.read_bytes()).numpy()
        assert 0 < needed < available / 4, path.name  # real photos are far from the bound


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_claiming_more_than_its_data_is_refused_with_both_sizes(sample_files, progressive):
    data = claiming(_encode(Image.fromarray(_pattern()), "JPEG", progressive=progressive), 7999, 7999)
    message = _check_error(data, name="holiday.jpg")
    assert message.startswith("holiday.jpg: JPEG header announces 7999x7999 pixels, which need at least ")
    assert f"the file holds {imageinfo.data_facts(data).numpy()[2]}" in message
    dataset = tf.data.Dataset.from_tensors(data).map(lambda d: imageinfo.check_header(d, 64_000_000))
    with pytest.raises(tf.errors.InvalidArgumentError, match="announces 7999x7999 pixels, which need"):
        list(dataset)


def test_arithmetic_coded_jpegs_are_not_bounded():
    data = bytearray(claiming(_encode(Image.fromarray(_pattern()), "JPEG"), 7999, 7999))
    sof = data.find(b"\xff\xc0")
    data[sof + 1] = 0xC9  # SOF9, arithmetic coding: no bits-per-block bound exists
    assert imageinfo.data_facts(bytes(data)).numpy()[1] == 0


def test_require_raises_with_the_name_in_front_eagerly_and_in_graphs():
    result = tf.constant([1, 2])
    assert imageinfo.require(tf.constant(True), tf.constant("never"), result).numpy().tolist() == [1, 2]
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        imageinfo.require(tf.constant(False), tf.constant("too wide"), result, name="a.png")
    assert caught.value.message == "a.png: too wide"

    @tf.function
    def checked(ok):
        return imageinfo.require(ok, tf.constant("too wide"), result, name=tf.constant("image_bytes[3]"))

    assert checked(tf.constant(True)).numpy().tolist() == [1, 2]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[3\]: too wide"):
        checked(tf.constant(False))


# ----------------------------------------------------------------------------- check_header


def _check_error(data, max_pixels=64_000_000, name="uploads/photo.jpg"):
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        imageinfo.check_header(data, max_pixels, name=name)
    return caught.value.message


def test_check_header_passes_a_good_image_and_returns_its_shape(sample_files):
    data = sample_files["webp_lossy"][1].read_bytes()
    assert tuple(imageinfo.check_header(data, HEIGHT * WIDTH).numpy()) == (HEIGHT, WIDTH)
    message = _check_error(data, max_pixels=HEIGHT * WIDTH - 1, name=None)
    assert f"announces {WIDTH}x{HEIGHT} = {HEIGHT * WIDTH} pixels" in message
    assert f"over the cap of {HEIGHT * WIDTH - 1}" in message
    assert not message.startswith(":")


def test_check_header_rejects_a_huge_jpeg_with_name_and_cap():
    message = _check_error(_hostile_jpeg())
    assert message.startswith("uploads/photo.jpg: ")
    assert "image header announces 30000x30000 = 900000000 pixels" in message
    assert "over the cap of 64000000; raise max_pixels if this is intended" in message


def test_check_header_rejects_a_huge_png():
    message = _check_error(_hostile_png(height=20000, width=15000), name="big.png")
    assert "big.png: image header announces 15000x20000 = 300000000" in message


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "image is empty (0 bytes)"),
        (_garbage(), "match no JPEG, PNG, GIF, BMP or WebP signature"),
        (b"II*\x00" + bytes(100), "TIFF, which TensorFlow cannot decode"),
        (b"\xff\x0a" + bytes(100), "JPEG XL"),
        (_hostile_jpeg()[:150], "JPEG header is unreadable (truncated or malformed, 150 bytes)"),
        (_hostile_png()[:20], "PNG header is unreadable"),
    ],
    ids=["empty", "garbage", "tiff", "jxl", "truncated-jpeg", "truncated-png"],
)
def test_check_header_names_the_problem_and_the_file(data, expected):
    message = _check_error(data)
    assert expected in message
    assert message.startswith("uploads/photo.jpg: ")


def test_check_header_tiff_message_suggests_converting(tmp_path):
    path = tmp_path / "scan.tif"
    Image.fromarray(_pattern()).save(path)
    message = _check_error(path.read_bytes(), name=str(path))
    assert str(path) in message and "convert it" in message


def test_check_header_raises_inside_tf_data_with_the_message():
    items = tf.constant([_hostile_png(), _hostile_jpeg()])
    names = tf.constant(["a/first.png", "b/second.jpg"])
    dataset = tf.data.Dataset.from_tensor_slices((items, names)).map(
        lambda d, n: imageinfo.check_header(d, 64_000_000, name=n)
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset.as_numpy_iterator())
    message = caught.value.message
    assert "a/first.png: image header announces 20000x20000 = 400000000" in message
    assert "over the cap of 64000000" in message


def test_check_header_in_tf_data_passes_good_images(sample_files):
    items = [path.read_bytes() for fmt, path in sample_files.values()]
    dataset = tf.data.Dataset.from_tensor_slices(items).map(
        lambda d: imageinfo.check_header(d, tf.constant(HEIGHT * WIDTH, tf.int64))
    )
    assert [tuple(s) for s in dataset.as_numpy_iterator()] == [(HEIGHT, WIDTH)] * len(items)


def test_check_header_rejects_a_nonpositive_cap():
    with pytest.raises(ConfigError, match="max_pixels"):
        imageinfo.check_header(b"", 0)


# ----------------------------------------------------------------------------- properties

_SIGNATURES = [
    b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00II*\x00\x08\x00\x00\x00",
    b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00MM\x00*\x00\x00\x00\x08", b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
    b"RIFF\x00\x00\x00\x00WEBPVP8X", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"II*\x00", b"MM\x00*",
]


@functools.lru_cache(maxsize=None)
def _exif_jpeg():
    return _encode(Image.fromarray(_pattern()), "JPEG", exif=_exif(6))


def _assert_valid_facts(data):
    fmt = imageinfo.image_format(data).numpy().decode()
    height, width = imageinfo.header_shape(data).numpy()
    orientation = int(imageinfo.exif_orientation(data))
    assert fmt in imageinfo.FORMATS
    assert (height, width) == (-1, -1) or (1 <= height < 2**31 and 1 <= width < 2**31)
    assert 1 <= orientation <= 8
    facts = imageinfo.data_facts(data).numpy()
    assert facts.shape == (5,) and facts[0] in (0, 1) and facts[1] >= 0
    assert len(imageinfo.first_image(data).numpy()) <= len(data) + 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(_SIGNATURES), body=st.binary(max_size=400))
def test_random_bytes_never_raise(prefix, body):
    _assert_valid_facts(prefix + body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
       length=st.integers(0, 2000))
def test_corrupted_jpeg_headers_never_raise(edits, length):
    data = bytearray(_exif_jpeg()[:length])
    for position, value in edits:
        if position < len(data):
            data[position] = value
    _assert_valid_facts(bytes(data))
