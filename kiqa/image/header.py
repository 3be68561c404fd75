"""Facts read from an encoded image's header, in pure TensorFlow ops: format, size, orientation.

These are the building blocks of `kiqa.image.decode_image`, which runs eagerly, inside
`tf.data.Dataset.map` and inside the exported SavedModel that TF Serving runs. So every
function here is made of graph ops only (`tf.strings.substr`, `tf.io.decode_raw`,
`tf.while_loop`, `tf.switch_case` ...) on a scalar `tf.string`, and the header readers are
`tf.function`s with a fixed signature: the eager call runs the very graph that `Dataset.map`
and the SavedModel inline, so the two cannot drift apart.

Nothing here allocates in proportion to the size a header announces: every read is a fixed
handful of bytes, except the EXIF directory, which is bounded by the segment holding it.
That is the point: TF's PNG decoder has no size cap (a 1.2 MB PNG decoded to 1.2 GB), so the
size must be checked before `tf.io.decode_image` runs. Walks over JPEG segments, GIF blocks
and PNG/WebP chunks are `tf.while_loop`s with a fixed iteration bound, so hostile files cost
bounded time (a few milliseconds; ~10 ms for the worst JPEG).

Besides the size, the header tells what the decoders would do wrong: a GIF is cut after its
first image (`first_image`: giflib decodes every frame otherwise), an animated WebP is
refused by name, and a JPEG whose coded data is too short for the size its header announces
is refused (libjpeg would paint the rest grey and say nothing).
"""

import tensorflow as tf

from kiqa.errors import ConfigError

# Names `image_format` returns. TF 2.21's `tf.io.decode_image` also decodes JPEG XL, so it
# is recognised (by TF's own signatures) instead of being reported as unknown.
FORMATS = ("unknown", "jpeg", "png", "gif", "bmp", "webp", "tiff", "jxl")
# Formats whose size header kiqa reads, so `check_header` can enforce the pixel cap.
CHECKED_FORMATS = ("jpeg", "png", "gif", "bmp", "webp")
_DISPLAY_NAMES = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP", "TIFF", "JPEG XL")
_UNKNOWN, _JPEG, _PNG, _GIF, _BMP, _WEBP, _TIFF, _JXL = range(len(FORMATS))

# The walk over a JPEG's marker segments reads _JPEG_WINDOW bytes per loop step and
# follows every segment, fill byte and stray byte inside them at once, so a step costs the
# same for one segment or a thousand. Phone and camera JPEGs have 5-20 segments before the
# frame header (APP0/APP1 Exif/XMP, a few APP2 ICC chunks, DQT, DHT), but a valid file may
# also hold thousands of comment segments or any number of 0xFF fill bytes (libjpeg
# accepts both, and skips stray bytes between segments). So the walk is bounded by bytes,
# not segments: it gives up after _MAX_JPEG_STEPS windows, each either _JPEG_WINDOW bytes
# of small segments or one larger segment (~1 ms a step on 2 busy cores).
_JPEG_WINDOW = 4096
_MAX_JPEG_STEPS = 256
# Hops followed one by one in a window before the walk falls back to pointer doubling.
_JPEG_HOPS = 16
# GIF data comes in sub-blocks of at most 255 bytes that can only be found one after the
# other. _GIF_HOPS of them per loop step, _MAX_GIF_STEPS steps: GIFs of 16 MB and more.
_GIF_HOPS = 16
_MAX_GIF_STEPS = 4096
# Chunks walked in a PNG (before its first IDAT) or a WebP (animation frames included).
_MAX_CHUNKS = 256

# Decode cost the pixel cap does not see (issue 24). libjpeg decodes every scan of a
# progressive JPEG over the whole image, so a small file repeating one scan thousands of
# times costs minutes (2.5 MB took 89 s). libjpeg's own progressive script writes 10 scans
# (6 for grey), other encoders about as many; NVIDIA's nvImageCodec refuses more than 256.
MAX_JPEG_SCANS = 100  # not the MOS scale
# TF's PNG decoder (libpng, png_read_info and png_read_end) inflates every compressed text
# chunk, before and after the image data, up to 8 MB each, and keeps the text until the
# decode ends: 1,000 of them in a 7.7 MB file cost ~8 GB. Real files hold a handful
# (ImageMagick and exiftool write 2-4 profiles as zTXt; XMP is one iTXt).
MAX_PNG_TEXT_CHUNKS = 16
# The progressive SOF markers: a frame decoded scan by scan over the whole image.
_PROGRESSIVE_SOF_MARKERS = (0xC2, 0xC6, 0xCA, 0xCE)

# JPEG SOF0..SOF15 (C0..CF) carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share
# the range but are tables.
_SOF_RANGE = (0xC0, 0xCF)
_NOT_SOF = (0xC4, 0xC8, 0xCC)
_EXIF_ORIENTATION_TAG = 0x0112
# PNG allows widths and heights up to 2**31 - 1; a larger value is a corrupt header, and
# refusing it keeps height * width inside int64 for every format.
_MAX_DIMENSION = 2**31 - 1

_SCALAR_STRING = [tf.TensorSpec([], tf.string)]


# ----------------------------------------------------------------------------- byte reading


def _int64(value):
    return tf.constant(value, tf.int64)


def _length(contents):
    return tf.cast(tf.strings.length(contents), tf.int64)


def _read(contents, n, pos, count):
    """`count` bytes from `pos` as int64 [count]; bytes past the end read as 0.

    `tf.strings.substr` fails when `pos` is past the end, so `pos` is clamped; the result
    always has the static length `count`, whatever the input.
    """
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, n)
    piece = tf.strings.substr(contents, pos, tf.constant(count, tf.int64))
    return tf.cast(tf.io.decode_raw(piece, tf.uint8, fixed_length=count), tf.int64)


def _big_endian(b):
    """Unsigned big-endian integer from the last axis of an int64 byte tensor."""
    value = b[..., 0]
    for i in range(1, b.shape[-1]):
        value = value * 256 + b[..., i]
    return value


def _little_endian(b):
    return _big_endian(tf.reverse(b, axis=[-1]))


def _endian(b, little):
    return tf.where(little, _little_endian(b), _big_endian(b))


def _matches(b, offset, signature):
    """True where bytes `b[..., offset:offset+len(signature)]` equal `signature`."""
    expected = tf.constant(list(signature), b.dtype)
    return tf.reduce_all(b[..., offset : offset + len(signature)] == expected, axis=-1)


def _as_signed32(value):
    return tf.where(value >= 2**31, value - 2**32, value)


# ----------------------------------------------------------------------------- format


def _format_index(contents, n):
    """Index into FORMATS, from the same leading-byte signatures TF's decoder dispatches on."""
    b = _read(contents, n, 0, 12)

    def starts(signature):
        return (n >= len(signature)) & _matches(b, 0, signature)

    checks = [
        (_JPEG, starts(b"\xff\xd8\xff")),
        (_PNG, starts(b"\x89PNG\r\n\x1a\n")),
        (_GIF, starts(b"GIF8")),
        (_BMP, starts(b"BM")),
        (_WEBP, starts(b"RIFF") & (n >= 12) & _matches(b, 8, b"WEBP")),
        (_TIFF, starts(b"II*\x00") | starts(b"MM\x00*") | starts(b"II+\x00") | starts(b"MM\x00+")),
        (_JXL, starts(b"\xff\x0a") | starts(b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
    ]
    index = tf.constant(_UNKNOWN, tf.int32)
    for format_index, hit in reversed(checks):  # the first signature that matches wins
        index = tf.where(hit, tf.constant(format_index, tf.int32), index)
    return index


@tf.function(input_signature=_SCALAR_STRING, autograph=False)
def image_format(contents):
    """Names an encoded image's format from its leading bytes (its magic number).

    Args:
        contents: scalar `tf.string`, the encoded file.

    Returns:
        Scalar `tf.string`: one of b"jpeg", b"png", b"gif", b"bmp", b"webp", b"tiff",
        b"jxl" (JPEG XL, which TF 2.21 also decodes) or b"unknown". The signatures are the
        ones `tf.io.decode_image` dispatches on, so a name here is the decoder TF will try.
    """
    index = _format_index(contents, _length(contents))
    return tf.gather(tf.constant(FORMATS), index)


# ----------------------------------------------------------------------------- JPEG


def _walk_jpeg(contents, n, is_target):
    """Position of the first JPEG marker segment for which `is_target` holds, else -1.

    Walks from just after SOI the way libjpeg does: a marker is 0xFF + code; 0xFF fill bytes,
    stuffed 0xFF00 and stray bytes are stepped over; RSTn and TEM have no length; every
    other segment is skipped by its 16-bit big-endian length. The walk stops at SOS (image
    data follows, and every header segment comes before it), EOI, the end of the bytes, or
    after _MAX_JPEG_STEPS loop steps.

    One loop step reads a window of _JPEG_WINDOW bytes and computes, for every offset in
    it at once, where the walk would go next from there; the walk's path through the
    window is then followed (`_path_end`) to the first offset that is the target, a stop,
    or whose next position leaves the window. A loop step costs ~40 graph ops (~60 when
    the path is long) however many segments it crosses.

    Args:
        contents: scalar `tf.string`, already known to start with FF D8.
        n: int64 length of `contents`.
        is_target: `(b, pos) -> bool tensor`, where b is int64 [..., 10], the bytes at
            each `pos` (int64 [...]).
    """
    not_found, gave_up = tf.constant(-1, tf.int64), tf.constant(-2, tf.int64)
    # int32 inside the window: its offsets, bytes and segment lengths all fit.
    offsets = tf.range(_JPEG_WINDOW, dtype=tf.int32)

    def searching(step, pos, found):
        return (step < _MAX_JPEG_STEPS) & (found == not_found)

    def step_once(step, pos, found):
        window = tf.cast(_read(contents, n, pos, _JPEG_WINDOW + 9), tf.int32)
        b = tf.stack([window[j : j + _JPEG_WINDOW] for j in range(10)], axis=-1)
        here = pos + tf.cast(offsets, tf.int64)
        code = b[:, 1]
        at_marker = b[:, 0] == 0xFF
        # 0xFF 0xFF is fill before a marker; 0xFF 0x00 is a stuffed byte, not a marker.
        not_a_marker = ~at_marker | (code == 0xFF) | (code == 0x00)
        no_length = ((code >= 0xD0) & (code <= 0xD7)) | (code == 0x01)
        segment_length = b[:, 2] * 256 + b[:, 3]
        hit = at_marker & ~not_a_marker & is_target(b, here)
        end = (
            (here + 2 > n)
            | (at_marker & ((code == 0xDA) | (code == 0xD9) | (code == 0xD8)))
            | (at_marker & ~not_a_marker & ~no_length & (segment_length < 2))
        )
        advance = tf.where(not_a_marker, 1, tf.where(no_length, 2, 2 + segment_length))
        following = offsets + advance
        # `jump[i]`: i itself where the walk ends or leaves the window at i, else the next
        # offset. Squaring it (jump = jump[jump]) doubles the steps it takes; a path has
        # fewer steps than the window has bytes, so log2(window) squarings reach its end.
        jump = tf.where(hit | end | (following >= _JPEG_WINDOW), offsets, following)
        last = _path_end(jump)
        found = tf.where(hit[last], here[last], tf.where(end[last], gave_up, not_found))
        return step + 1, pos + tf.cast(following[last], tf.int64), found

    _, _, found = tf.while_loop(
        searching,
        step_once,
        (tf.constant(0, tf.int32), tf.constant(2, tf.int64), not_found),
        parallel_iterations=1,
    )
    return tf.where(found >= 0, found, not_found)


def _path_end(jump):
    """Where the path from offset 0 through `jump` stops: the first i with jump[i] == i.

    Every path stops within the window (it only moves forward), so `jump` squared
    log2(window) times (jump = jump[jump], pointer doubling) maps 0 to its stop. A real
    JPEG's path is a handful of segments: it is first followed hop by hop, which costs a
    tenth of the squarings (each a gather over the whole window), and squared only when
    it is still going after _JPEG_HOPS hops (fill bytes, stray bytes, thousands of tiny
    segments). Both give the same stop; only the cost differs.
    """
    position = tf.constant(0, jump.dtype)
    for _ in range(_JPEG_HOPS):
        position = tf.gather(jump, position)

    def squared():
        doubled = jump
        for _ in range((_JPEG_WINDOW - 1).bit_length()):
            doubled = tf.gather(doubled, doubled)
        return doubled[0]

    return tf.cond(tf.equal(tf.gather(jump, position), position), lambda: position, squared)


def _jpeg_frame_header(contents, n):
    """Position of the JPEG frame header (SOF0..SOF15) whose size libjpeg decodes, else -1."""

    def is_frame_header(b, pos):
        code = b[..., 1]
        # Comparisons, not a lookup in a constant set: half the cost at every window offset.
        is_sof = (code >= _SOF_RANGE[0]) & (code <= _SOF_RANGE[1])
        for table in _NOT_SOF:
            is_sof = is_sof & (code != table)
        # Length, precision, height, width: 9 bytes must be there to read the size.
        return is_sof & (b[..., 2] * 256 + b[..., 3] >= 8) & (pos + 9 <= n)

    return _walk_jpeg(contents, n, is_frame_header)


def _jpeg_shape(contents, n):
    pos = _jpeg_frame_header(contents, n)
    b = _read(contents, n, pos, 9)
    shape = tf.stack([_big_endian(b[5:7]), _big_endian(b[7:9])])
    return tf.where(pos >= 0, shape, tf.constant([-1, -1], tf.int64))


def _jpeg_data(contents, n):
    """(fewest bytes of coded image data the frame header's size needs, bytes the file has).

    libjpeg does not fail when the coded data runs out before the frame header's size is
    filled: it warns ("premature end of data segment") and paints the rest grey, so a
    512x384 photo whose header was rewritten to 7999x7999 decodes, at the header's size,
    to a grey field with a strip of noise, and would be scored. A size the data cannot
    hold is found from the header instead: every 8x8 block of every component costs at
    least one Huffman code of 1 bit or more for its DC coefficient, and in a sequential
    (baseline or extended) JPEG one more for its AC coefficients (an end-of-block code at
    the least). So a Huffman-coded frame needs at least blocks * 2 bits (SOF0, SOF1) or
    blocks * 1 bit (progressive SOF2) after its first scan header. This is a lower bound
    that any real JPEG exceeds (a flat grey image with optimised tables comes nearest);
    arithmetic-coded and lossless frames, which have no such bound, are not checked. It
    catches a header that claims far more than the data holds, not every altered one.

    Returns:
        int64 (needed, available, scans): needed is 0 when not checked; available counts
        the bytes from the first SOS marker (or, without one, the frame header) to the
        end; scans is what `_jpeg_scans` counts.
    """
    sof = _jpeg_frame_header(contents, n)
    b = _read(contents, n, sof, 22)
    height, width, count = _big_endian(b[5:7]), _big_endian(b[7:9]), b[9]
    # Up to four components (id, sampling factors H << 4 | V, table): 1, 3 or 4 in
    # practice; leaving any further ones out keeps the bound a lower bound.
    sampling = tf.reshape(b[10:22], [4, 3])[:, 1]
    present = tf.range(4, dtype=tf.int64) < count
    horizontal = tf.where(present, sampling // 16, 0)
    vertical = tf.where(present, sampling % 16, 0)
    h_max = tf.maximum(tf.reduce_max(horizontal), 1)
    v_max = tf.maximum(tf.reduce_max(vertical), 1)
    columns = (width * horizontal + h_max - 1) // h_max  # the component's own size
    rows = (height * vertical + v_max - 1) // v_max
    blocks = tf.reduce_sum(((columns + 7) // 8) * ((rows + 7) // 8))
    marker = b[1]
    bits = tf.where(
        (marker == 0xC0) | (marker == 0xC1), _int64(2), tf.where(marker == 0xC2, _int64(1), _int64(0))
    )
    needed = tf.where(sof >= 0, (blocks * bits + 7) // 8, _int64(0))
    scan = _walk_jpeg(contents, n, lambda b, pos: b[..., 1] == 0xDA)
    available = n - tf.maximum(tf.where(scan >= 0, scan, sof), 0)
    return needed, available, _jpeg_scans(contents, n, sof, scan, marker, count)


def _jpeg_scans(contents, n, sof, scan, marker, count):
    """How many scans (SOS markers) libjpeg would decode, from the first scan on.

    Only a frame that is progressive or whose first scan leaves out a component is
    decoded scan by scan; a single-scan sequential JPEG (what cameras write) stops
    libjpeg at its second SOS with an error, at no cost, so its bytes are not searched.
    In coded data every 0xFF byte is followed by 0x00 or a marker, so FF DA there is a
    scan; one in a segment between scans (a comment) would be counted too, which only
    errs towards refusing a crafted file.
    """
    components_in_scan = _read(contents, n, scan, 5)[4]
    progressive = tf.reduce_any(marker == tf.constant(_PROGRESSIVE_SOF_MARKERS, tf.int64))
    scan_by_scan = (sof >= 0) & (scan >= 0) & (progressive | (components_in_scan < count))
    return tf.cond(
        scan_by_scan,
        lambda: _occurrences(contents, n, scan, b"\xff\xda"),
        lambda: tf.where(scan >= 0, _int64(1), _int64(0)),
    )


def _occurrences(contents, n, start, needle, after=None):
    """How often `needle` occurs in contents[start:] (preceded by a byte in `after`).

    One StringSplitV2 finds them in one pass (memory: one copy of the bytes); a walk in
    graph ops would cost a loop step each. The raw op, not `tf.strings.split`, whose
    ragged result adds ops that kiqa's SavedModel allow list has no need for.
    """
    start = tf.clip_by_value(start, 0, n)
    tail = tf.strings.substr(contents, start, n - start)
    _, pieces, _ = tf.raw_ops.StringSplitV2(input=tf.reshape(tail, [1]), sep=needle, maxsplit=-1)
    if after is None:
        return tf.cast(tf.size(pieces), tf.int64) - 1
    before = pieces[:-1]  # each is followed by the needle
    lengths = tf.strings.length(before)
    last = tf.strings.substr(before, tf.maximum(lengths - 1, 0), tf.ones_like(lengths))
    hits = tf.zeros_like(last, tf.bool)
    for byte in after:
        hits = hits | tf.equal(last, bytes([byte]))
    return tf.reduce_sum(tf.cast(hits, tf.int64))


def _png_text_chunks(contents, n):
    """zTXt and iTXt chunks anywhere in a PNG (libpng inflates them before and after the
    image data). The type is searched for, not walked to: a walk over every IDAT chunk
    of a large PNG costs a loop step each. In compressed image data a false match has a
    chance of 2**-32 per byte, which only errs towards refusing."""
    return _occurrences(contents, n, _int64(8), b"TXt", after=b"zi")


def _jpeg_orientation(contents, n):
    def is_exif(b, pos):
        # APP1 whose payload starts with the Exif identifier (XMP also lives in APP1).
        # Byte by byte, not `_matches`: at every offset of a walk's window that cost half
        # of the walk (`_matches` stays elsewhere: its few ops keep graphs quick to build).
        exif = (b[..., 1] == 0xE1) & (b[..., 2] * 256 + b[..., 3] >= 8)
        for i, byte in enumerate(b"Exif\x00\x00"):
            exif = exif & (b[..., 4 + i] == byte)
        return exif

    pos = _walk_jpeg(contents, n, is_exif)

    def parse():
        b = _read(contents, n, pos, 4)
        segment_end = pos + 2 + b[2] * 256 + b[3]
        return _tiff_orientation(contents, n, pos + 10, segment_end)

    return tf.cond(pos >= 0, parse, lambda: tf.constant(1, tf.int32))


# ----------------------------------------------------------------------------- EXIF (TIFF)


def _tiff_orientation(contents, n, start, end):
    """Orientation tag (0x0112) of IFD0 of the TIFF structure in contents[start:end], else 1.

    EXIF is a little TIFF file: "II" (little-endian) or "MM" (big-endian), the number 42,
    the offset of IFD0 from `start`; IFD0 is a 16-bit entry count and 12-byte entries
    (tag, type, count, value). The entries are read in one slice, bounded by `end`.
    """
    end = tf.minimum(end, n)
    head = _read(contents, n, start, 8)
    little = _matches(head, 0, b"II")
    big = _matches(head, 0, b"MM")
    ifd = start + _endian(head[4:8], little)
    valid = (
        (little | big)
        & (_endian(head[2:4], little) == 42)
        & (start + 8 <= end)
        & (ifd + 2 <= end)
    )
    count = _endian(_read(contents, n, ifd, 2), little)
    room = tf.maximum(end - ifd - 2, 0) // 12
    entries = tf.where(valid, tf.minimum(count, room), tf.constant(0, tf.int64))
    raw = tf.strings.substr(contents, tf.clip_by_value(ifd + 2, 0, n), 12 * entries)
    table = tf.reshape(tf.cast(tf.io.decode_raw(raw, tf.uint8), tf.int64), [-1, 12])
    tag = _endian(table[:, 0:2], little)
    kind = _endian(table[:, 2:4], little)
    values = _endian(table[:, 4:8], little)
    # The value sits left-aligned in the 4-byte field: SHORT (3) in its first two bytes,
    # LONG (4) in all four. Writers use SHORT; LONG is read too, as PIL does.
    value = tf.where(kind == 3, _endian(table[:, 8:10], little), _endian(table[:, 8:12], little))
    is_orientation = (tag == _EXIF_ORIENTATION_TAG) & ((kind == 3) | (kind == 4)) & (values == 1)
    # The last entry wins, as in PIL (it fills a dict in file order).
    orientation = tf.concat([_int64([1]), tf.boolean_mask(value, is_orientation)], axis=0)[-1]
    orientation = tf.where((orientation >= 1) & (orientation <= 8), orientation, _int64(1))
    return tf.cast(orientation, tf.int32)


# ----------------------------------------------------------------------------- PNG, WebP chunks


def _walk_chunks(contents, n, start, target, stops, little_endian, pad_even):
    """Position of the first chunk of type `target` (PNG or RIFF layout), else -1.

    A chunk is a 4-byte length and a 4-byte type (PNG, big-endian, with a 4-byte CRC after
    the data) or a 4-byte type and a 4-byte length (RIFF, little-endian, data padded to an
    even length). The walk stops at any type in `stops`, the end, or after _MAX_CHUNKS.
    """
    not_found, gave_up = tf.constant(-1, tf.int64), tf.constant(-2, tf.int64)

    def searching(step, pos, found):
        return (step < _MAX_CHUNKS) & (found == not_found)

    def step_once(step, pos, found):
        b = _read(contents, n, pos, 8)
        if little_endian:
            kind, size, trailer = b[0:4], _little_endian(b[4:8]), 0
        else:
            kind, size, trailer = b[4:8], _big_endian(b[0:4]), 4

        def is_type(name):
            return tf.reduce_all(kind == tf.constant(list(name), tf.int64))
        hit = is_type(target) & (pos + 8 + size <= n)
        end = (pos + 8 > n) | (size > _MAX_DIMENSION)
        for name in stops:
            end = end | is_type(name)
        padding = size % 2 if pad_even else 0
        found = tf.where(hit, pos, tf.where(end, gave_up, not_found))
        return step + 1, pos + 8 + size + trailer + padding, found

    _, _, found = tf.while_loop(
        searching,
        step_once,
        (tf.constant(0, tf.int32), tf.cast(start, tf.int64), not_found),
        parallel_iterations=1,
    )
    return tf.where(found >= 0, found, not_found)


def _png_orientation(contents, n):
    # libpng and Pillow write eXIf before the image data; one after IDAT is not looked for
    # (reaching it would mean walking every IDAT chunk of a large image).
    pos = _walk_chunks(
        contents, n, 8, b"eXIf", (b"IDAT", b"IEND"), little_endian=False, pad_even=False
    )

    def parse():
        size = _big_endian(_read(contents, n, pos, 4))
        return _tiff_orientation(contents, n, pos + 8, pos + 8 + size)

    return tf.cond(pos >= 0, parse, lambda: tf.constant(1, tf.int32))


def _webp_orientation(contents, n):
    pos = _walk_chunks(contents, n, 12, b"EXIF", (), little_endian=True, pad_even=True)

    def parse():
        size = _little_endian(_read(contents, n, pos + 4, 4))
        # Some writers keep JPEG's "Exif\0\0" identifier in front of the TIFF header.
        prefixed = _matches(_read(contents, n, pos + 8, 6), 0, b"Exif\x00\x00")
        start = pos + 8 + tf.where(prefixed, _int64(6), _int64(0))
        return _tiff_orientation(contents, n, start, pos + 8 + size)

    return tf.cond(pos >= 0, parse, lambda: tf.constant(1, tf.int32))


# ----------------------------------------------------------------------------- sizes


def _unknown_shape():
    return tf.constant([-1, -1], tf.int64)


def _shape_or_unknown(ok, height, width):
    return tf.where(ok, tf.stack([height, width]), _unknown_shape())


def _png_shape(contents, n):
    # The signature is followed by IHDR: length 13, "IHDR", width, height (big-endian).
    b = _read(contents, n, 0, 24)
    return _shape_or_unknown(
        (n >= 24) & _matches(b, 12, b"IHDR"), _big_endian(b[20:24]), _big_endian(b[16:20])
    )


def _colour_table_size(flags):
    # Bit 7 says a colour table follows; bits 0-2 give its 2**(k+1) RGB entries.
    size = 3 * tf.bitwise.left_shift(_int64(2), flags % 8)
    return tf.where(flags >= 128, size, _int64(0))


def _gif_first_image(contents, n):
    """The first image of a GIF: its (height, width) and the offset where its data ends.

    kiqa decodes only this image (`first_image` cuts the file after it), so its size is
    the canvas TF decodes to: TF 2.21 sizes the canvas by the largest frame it is given
    and ignores the logical screen in the header (a GIF whose screen says 10x8 around a
    20x30 frame decodes to 20x30), and giflib decodes every frame of the file, even when
    only the first is kept. The walk steps over the blocks before the first image
    (extensions: graphic control, comments, application blocks) and over the image's
    data sub-blocks (at most 255 bytes each), _GIF_HOPS per loop step, at most
    _MAX_GIF_STEPS steps; it stops where the first image's data ends, so what follows
    (more frames, a truncated last frame, a missing trailer) is never read. A GIF whose
    first image is cut short, has no image, or needs more steps gives an unknown shape.

    Returns:
        (int64 [2] shape or [-1, -1], int64 offset just past the first image's data).
    """
    head = _read(contents, n, 0, 13)

    def walking(step, pos, in_run, in_image, height, width, done, broken):
        return (step < _MAX_GIF_STEPS) & ~done & ~broken & (pos < n)

    def step_once(step, pos, in_run, in_image, height, width, done, broken):
        # A block: extension (0x21, label, sub-blocks), image (0x2C, left, top, width,
        # height, flags with the local colour table size, table, LZW code size byte,
        # sub-blocks) or the trailer 0x3B. A trailer before any image, or anything else
        # where a block starts, ends the walk with no image.
        b = _read(contents, n, pos, 10)
        at_block = ~in_run
        is_extension = at_block & (b[0] == 0x21)
        is_image = at_block & (b[0] == 0x2C) & (pos + 11 <= n)
        broken = at_block & ~(is_extension | is_image)
        height = tf.where(is_image, _little_endian(b[7:9]), height)
        width = tf.where(is_image, _little_endian(b[5:7]), width)
        opening = tf.where(is_extension, _int64(2), 11 + _colour_table_size(b[9]))
        pos = tf.where(is_extension | is_image, pos + opening, pos)
        in_image = tf.where(at_block, is_image, in_image)
        in_run = in_run | is_extension | is_image
        # Sub-blocks: a size byte and that many bytes; size 0 ends the run. Several hops
        # per loop step, because a loop step costs more than the hop itself. A run that
        # reaches the end of the bytes stays open: the image is incomplete.
        for _ in range(_GIF_HOPS):
            size = _read(contents, n, pos, 1)[0]
            hop = in_run & (pos < n)
            ended = hop & (size == 0)
            pos = tf.where(hop, pos + 1 + size, pos)
            done = done | (ended & in_image)
            in_run = in_run & ~ended
        return step + 1, pos, in_run, in_image, height, width, done, broken

    zero, no = _int64(0), tf.constant(False)
    start = 13 + _colour_table_size(head[10])
    _, end, _, _, height, width, done, _ = tf.while_loop(
        walking,
        step_once,
        (tf.constant(0, tf.int32), start, no, no, zero, zero, no, no),
        parallel_iterations=1,
    )
    ok = (n >= 13) & done & (end <= n)
    return _shape_or_unknown(ok, height, width), tf.where(ok, end, _int64(-1))


def _gif_shape(contents, n):
    return _gif_first_image(contents, n)[0]


def _bmp_shape(contents, n):
    # BITMAPINFOHEADER and its successors (V4, V5: 40 bytes and more) hold signed 32-bit
    # width and height at 18 and 22; a negative height means rows stored top-down. The
    # 12-byte OS/2 core header has 16-bit fields there, which TF misreads: reported unknown.
    b = _read(contents, n, 0, 26)
    ok = (n >= 26) & (_little_endian(b[14:18]) >= 40)
    height = tf.abs(_as_signed32(_little_endian(b[22:26])))
    width = _as_signed32(_little_endian(b[18:22]))
    return _shape_or_unknown(ok, height, width)


def _webp_shape(contents, n):
    b = _read(contents, n, 0, 30)
    # Lossy "VP8 ": key-frame start code 9D 01 2A, then 14-bit width and height (the top two
    # bits of each are an upscaling hint).
    lossy = _matches(b, 12, b"VP8 ") & (n >= 30) & _matches(b, 23, b"\x9d\x01\x2a")
    lossy_shape = tf.stack([_little_endian(b[28:30]) % 16384, _little_endian(b[26:28]) % 16384])
    # Lossless "VP8L": signature 0x2F, then 14 bits width - 1 and 14 bits height - 1.
    lossless = _matches(b, 12, b"VP8L") & (n >= 25) & (b[20] == 0x2F)
    bits = _little_endian(b[21:25])
    lossless_shape = tf.stack([(bits // 16384) % 16384 + 1, bits % 16384 + 1])
    # Extended "VP8X": flags, 3 reserved bytes, then 24-bit canvas width - 1 and height - 1.
    extended = _matches(b, 12, b"VP8X") & (n >= 30)
    extended_shape = tf.stack([_little_endian(b[27:30]) + 1, _little_endian(b[24:27]) + 1])
    shape = _unknown_shape()
    shape = tf.where(extended, extended_shape, shape)
    shape = tf.where(lossless, lossless_shape, shape)
    return tf.where(lossy, lossy_shape, shape)


@tf.function(input_signature=_SCALAR_STRING, autograph=False)
def header_shape(contents):
    """Reads (height, width) from an encoded image's header, without decoding it.

    Covers JPEG (the SOF0..SOF15 frame header, found by walking the marker segments; the
    walk is bounded), PNG (IHDR), GIF (the first image, the only one kiqa decodes; see
    `first_image`), BMP (BITMAPINFOHEADER and later; a negative, top-down height is
    reported positive) and WebP (VP8 lossy, VP8L lossless, VP8X extended canvas). Each is
    the size `tf.io.decode_image` allocates for what kiqa gives it. TIFF and JPEG XL
    are recognised by `image_format` but their size is not read here.
    `tf.image.extract_jpeg_shape` is not used: it raises on truncated or non-JPEG bytes,
    and this function must not.

    Args:
        contents: scalar `tf.string`, the encoded file.

    Returns:
        int64 [2] tensor (height, width) as announced by the header, or [-1, -1] when the
        format is unknown or unread, or the header is truncated, malformed or announces a
        zero or negative size. Never raises on any bytes; the caller decides what to do.
    """
    n = _length(contents)
    branches = [lambda: _unknown_shape()] * len(FORMATS)
    branches[_JPEG] = lambda: _jpeg_shape(contents, n)
    branches[_PNG] = lambda: _png_shape(contents, n)
    branches[_GIF] = lambda: _gif_shape(contents, n)
    branches[_BMP] = lambda: _bmp_shape(contents, n)
    branches[_WEBP] = lambda: _webp_shape(contents, n)
    shape = tf.switch_case(_format_index(contents, n), branches)
    shape.set_shape([2])
    valid = tf.reduce_all((shape > 0) & (shape <= _MAX_DIMENSION))
    return tf.where(valid, shape, _unknown_shape())


@tf.function(input_signature=_SCALAR_STRING, autograph=False)
def exif_orientation(contents):
    """Reads the EXIF orientation (1..8) that says how to turn the stored pixels upright.

    Covered: JPEG (the first APP1 "Exif" segment before the image data: what phones and
    cameras write), PNG (an eXIf chunk before the first IDAT, where libpng and Pillow put
    it), WebP (the EXIF chunk of an extended file) and TIFF (its own IFD0). GIF and BMP
    carry no orientation. The value is tag 0x0112 in IFD0, little- or big-endian.

    Args:
        contents: scalar `tf.string`, the encoded file.

    Returns:
        int32 scalar in 1..8; 1 (upright, nothing to do) when there is no EXIF block, it is
        truncated or malformed, or the tag is missing or out of range. Never raises.
    """
    n = _length(contents)
    branches = [lambda: tf.constant(1, tf.int32)] * len(FORMATS)
    branches[_JPEG] = lambda: _jpeg_orientation(contents, n)
    branches[_PNG] = lambda: _png_orientation(contents, n)
    branches[_WEBP] = lambda: _webp_orientation(contents, n)
    branches[_TIFF] = lambda: _tiff_orientation(contents, n, tf.constant(0, tf.int64), n)
    return tf.switch_case(_format_index(contents, n), branches)


def _webp_animated(contents, n):
    # An extended file (VP8X) says in its flags byte (offset 20) whether it is animated
    # (bit 1): the flag libwebp's WebPGetFeatures reports and TF dispatches on.
    b = _read(contents, n, 0, 21)
    return (n >= 21) & _matches(b, 12, b"VP8X") & ((b[20] // 2) % 2 == 1)


@tf.function(input_signature=_SCALAR_STRING, autograph=False)
def data_facts(contents):
    """Facts beyond the size that decide whether kiqa decodes an image at all.

    Args:
        contents: scalar `tf.string`, the encoded file.

    Returns:
        int64 [5]: (1 if an animated WebP else 0, the fewest bytes of coded image data a
        JPEG's frame header needs (0 for other formats, see `_jpeg_data`), the bytes the
        file holds from its first scan on, the scans libjpeg would decode one by one
        (`_jpeg_scans`; 0 for other formats), a PNG's zTXt and iTXt chunks). Never raises.
    """
    n = _length(contents)
    zero = _int64(0)
    none = lambda: tf.zeros([5], tf.int64)  # noqa: E731
    branches = [none] * len(FORMATS)
    branches[_JPEG] = lambda: tf.stack([zero, *_jpeg_data(contents, n), zero])
    branches[_PNG] = lambda: tf.stack([zero, zero, zero, zero, _png_text_chunks(contents, n)])
    branches[_WEBP] = lambda: tf.stack(
        [tf.cast(_webp_animated(contents, n), tf.int64), zero, zero, zero, zero]
    )
    facts = tf.switch_case(_format_index(contents, n), branches)
    facts.set_shape([5])
    return facts


@tf.function(input_signature=_SCALAR_STRING, autograph=False)
def first_image(contents):
    """The bytes to hand to TF's decoder: a GIF cut after its first image, else as given.

    giflib (inside `tf.io.decode_gif` and `decode_image`) decodes every frame of a GIF
    before TF keeps the first, so a 1.8 MB GIF of 40 frames of 7900x7900 cost 3.6 GB
    while the pixel cap counted one frame. Cut after the first image's data and ended
    with the trailer byte (0x3B), the file is a valid one-frame GIF: the extension
    blocks before the image (transparency, loop count, comments) are kept, everything
    after it is never decoded. The pixels of the first frame are the same, except that
    TF no longer pads it to the largest later frame (a canvas TF invents: GIF's own is
    the logical screen, which TF ignores).

    Args:
        contents: scalar `tf.string`, the encoded file.

    Returns:
        Scalar `tf.string`. A GIF whose first image cannot be found is returned as given
        (`check_header` refuses it before anything is decoded).
    """
    n = _length(contents)

    def gif():
        _, end = _gif_first_image(contents, n)
        return tf.cond(
            end > 0,
            lambda: tf.strings.join([tf.strings.substr(contents, _int64(0), end), b";"]),
            lambda: contents,
        )

    return tf.cond(tf.equal(_format_index(contents, n), _GIF), gif, lambda: contents)


# ----------------------------------------------------------------------------- checks


# Over 60 lines: one in-graph decision per format over the same header facts; split, each part would
# re-derive them (and every tf.cond branch must see the same tensors).
def _header_problem(n, format_index, shape, max_pixels, facts):
    """The message for the first thing wrong with a header, and whether anything is."""
    as_text = tf.strings.as_string
    format_name = tf.gather(tf.constant(_DISPLAY_NAMES), format_index)
    checked = tf.reduce_any(
        format_index == tf.constant([FORMATS.index(f) for f in CHECKED_FORMATS], tf.int32)
    )
    readable = shape[0] > 0
    pixels = shape[0] * shape[1]
    within = pixels <= max_pixels
    animated = facts[0] > 0
    needed, available = facts[1], facts[2]
    short = available < needed
    scans, text_chunks = facts[3], facts[4]
    problems = [  # in order: the first that applies is reported
        (
            n == 0,
            tf.constant("image is empty (0 bytes); check that the file was completely written"),
        ),
        (
            format_index == _TIFF,
            tf.constant(
                "image is TIFF, which TensorFlow cannot decode (it decodes JPEG, PNG, GIF, "
                "BMP and WebP); convert it, e.g. to PNG (lossless)"
            ),
        ),
        (
            format_index == _JXL,
            tf.constant(
                "image is JPEG XL, whose size kiqa cannot read from the header to enforce "
                "max_pixels; convert it to PNG (lossless) or JPEG"
            ),
        ),
        (
            format_index == _UNKNOWN,
            tf.strings.join([
                "image format not recognised: the first bytes of these ", as_text(n),
                " bytes match no JPEG, PNG, GIF, BMP or WebP signature; "
                "check that this is an image file and convert it to PNG or JPEG",
            ]),
        ),
        (
            animated,
            tf.constant(
                "image is an animated WebP; kiqa scores still images only (TensorFlow "
                "cannot decode WebP animations reliably); convert it to a still image, "
                "e.g. its first frame as PNG"
            ),
        ),
        (
            ~readable,
            tf.strings.join([
                format_name, " header is unreadable (truncated or malformed, ", as_text(n),
                " bytes); re-encode the file, e.g. as PNG",
            ]),
        ),
        (
            ~within,
            tf.strings.join([
                # width x height, the order image tools print sizes in
                "image header announces ", as_text(shape[1]), "x", as_text(shape[0]),
                " = ", as_text(pixels), " pixels, over the cap of ",
                as_text(max_pixels), "; raise max_pixels if this is intended",
            ]),
        ),
        (
            short,
            tf.strings.join([
                format_name, " header announces ", as_text(shape[1]), "x", as_text(shape[0]),
                " pixels, which need at least ", as_text(needed), " bytes of image data, but "
                "the file holds ", as_text(available), ": the header was altered or the data "
                "is cut short; re-encode the file from its source",
            ]),
        ),
        (
            scans > MAX_JPEG_SCANS,
            tf.strings.join([
                "JPEG has ", as_text(scans), " scans, over the limit of ",
                str(MAX_JPEG_SCANS), " (a progressive JPEG has about 10): the decoder reads "
                "every scan over the whole image, so this file could cost minutes; "
                "re-encode it, e.g. as a baseline JPEG or PNG",
            ]),
        ),
        (
            text_chunks > MAX_PNG_TEXT_CHUNKS,
            tf.strings.join([
                "PNG has ", as_text(text_chunks), " zTXt/iTXt text chunks, over the limit of ",
                str(MAX_PNG_TEXT_CHUNKS), ": the decoder inflates every compressed one (up "
                "to 8 MB each), so this file could cost seconds and gigabytes; strip its "
                "metadata or re-encode it, e.g. with Pillow or `optipng -strip all`",
            ]),
        ),
    ]
    message = tf.constant("")
    for condition, text in reversed(problems):
        message = tf.where(condition, text, message)
    costly = (scans > MAX_JPEG_SCANS) | (text_chunks > MAX_PNG_TEXT_CHUNKS)
    return checked & readable & within & ~animated & ~short & ~costly, message


def header_problem(contents, max_pixels):
    """What `check_header` decides, without raising: for callers that must go on.

    The SavedModel's lenient signature uses it to report a bad item and score the
    others, with the very message `check_header` would raise.

    Args:
        contents: scalar `tf.string`, the encoded file.
        max_pixels: int or int tensor, the largest height * width accepted.

    Returns:
        (shape, ok, message): int64 [2] header (height, width), scalar bool (the header
        passes), scalar string (why not; empty when it passes).
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    n = _length(contents)
    shape = header_shape(contents)
    ok, message = _header_problem(
        n, _format_index(contents, n), shape, tf.cast(max_pixels, tf.int64), data_facts(contents)
    )
    return shape, ok, message


def check_header(contents, max_pixels, name=None):
    """Checks that an encoded image is one kiqa decodes and announces at most `max_pixels`.

    Run it before `tf.io.decode_image`: TF's decoders allocate whatever the header
    announces. Failures raise in graphs too (a `tf.debugging.Assert`), so TF Serving
    answers INVALID_ARGUMENT with the same message instead of running out of memory.

    Args:
        contents: scalar `tf.string`, the encoded file.
        max_pixels: int or int tensor, the largest height * width accepted.
        name: optional scalar string (e.g. the file path), put in front of the message.

    Returns:
        int64 [2] tensor (height, width) from `header_shape`, valid when this returns.

    Raises:
        tf.errors.InvalidArgumentError: the bytes are empty, TIFF (TF has no TIFF decoder:
            convert it), JPEG XL (size unreadable here), of no known format, an animated
            WebP, have an unreadable header, announce more than `max_pixels` pixels,
            (JPEG) announce a size their coded data is too short to hold, would cost
            the decoder far more than their size (a JPEG of over MAX_JPEG_SCANS scans
            decoded one by one, a PNG of over MAX_PNG_TEXT_CHUNKS text chunks). In a graph it
            is raised when the graph runs.
        ConfigError: `max_pixels` is a Python number below 1.
    """
    if isinstance(max_pixels, (int, float)) and max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive pixel count, got {max_pixels}")
    shape, ok, message = header_problem(contents, max_pixels)
    return require(ok, message, shape, name=name)


def require(ok, message, result, name=None):
    """Returns `result` once `ok` holds; raises InvalidArgumentError with `message` if not.

    Eagerly it raises at once; in a graph (tf.data, a SavedModel) the check is a
    `tf.debugging.Assert` that `result` depends on, so it raises when the graph runs.
    The message is kept free of any batch position: the SavedModel's signature passes
    `image_bytes[i]` as `name`, put in front like a file path.

    Args:
        ok: scalar bool tensor.
        message: scalar string tensor, what is wrong and the fix.
        result: tensor returned when `ok` holds.
        name: optional scalar string (a file path, `image_bytes[i]`), put in front.

    Returns:
        `result` (in a graph, an identity of it that runs after the check).

    Raises:
        tf.errors.InvalidArgumentError: `ok` is false (in a graph: when it runs).
    """
    if name is not None:
        message = tf.strings.join([tf.convert_to_tensor(name, tf.string), ": ", message])
    if tf.executing_eagerly():
        # Same error type as the graph's Assert, without TF's "Expected 'False' to be
        # true. Summarized data: b'...'" wrapping around the message.
        if not bool(ok):
            text = message.numpy().decode("utf-8", "replace")
            raise tf.errors.InvalidArgumentError(None, None, text)
        return result
    check = tf.debugging.Assert(ok, [message])
    with tf.control_dependencies([check]):
        return tf.identity(result)


# ----------------------------------------------------------------------------- orientation


def apply_orientation(image, orientation):
    """Turns decoded pixels upright according to an EXIF orientation, as PIL's
    `ImageOps.exif_transpose` does.

    1 leaves the image as is; 2 flips left-right; 3 rotates 180 degrees; 4 flips up-down;
    5 transposes (mirrors across the main diagonal); 6 rotates 90 degrees clockwise;
    7 transverses (mirrors across the other diagonal); 8 rotates 90 degrees
    counter-clockwise. Any other value is treated as 1. 5 to 8 swap height and width, so
    in a graph the result's height and width are unknown unless the input is square.

    Args:
        image: [height, width, channels] tensor (or [batch, height, width, channels], all
            with the same orientation), any dtype, static shape not needed.
        orientation: int scalar tensor, e.g. from `exif_orientation`.

    Returns:
        The transformed image, same dtype and rank.
    """
    image = tf.convert_to_tensor(image)
    orientation = tf.cast(orientation, tf.int32)
    orientation = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
    # One transpose and one reverse with computed axes, not a switch_case of eight
    # tf.image calls: tf.data instantiates its functions anew for every SavedModel
    # request, and the eight branches' shape checks cost ~0.25 CPU-s there each time.
    # 5-8 transpose first; then 2, 3, 6, 7 flip the columns and 3, 4, 7, 8 the rows
    # (6, rotate 90 clockwise, is a transpose and a column flip).
    rank = image.shape.rank
    lead = rank - 3 if rank is not None else tf.rank(image) - 3  # 1 for a batch
    rows, cols = lead, lead + 1
    turned = orientation >= 5
    perm = tf.concat([
        tf.range(lead),
        tf.where(turned, tf.stack([cols, rows]), tf.stack([rows, cols])),
        [lead + 2],
    ], axis=0)
    transposed = tf.transpose(image, perm)
    flip_rows = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
    flip_cols = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
    turned_image = tf.reverse(transposed, tf.boolean_mask(tf.stack([rows, cols]), tf.stack([flip_rows, flip_cols])))
    if rank is not None:
        # A computed permutation hides the static shape: keep what holds for every turn.
        shape = image.shape.as_list()
        height, width = shape[-3], shape[-2]
        turned_image.set_shape(shape[:-3] + ([height, width] if height == width else [None, None]) + shape[-1:])
    return turned_image
