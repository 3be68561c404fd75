"""The hostile-input corpus: every bad file of issue 8, generated here (nothing downloaded).

`write_corpus(folder)` writes the files and returns a `Corpus` whose `cases` are the table
tests/test_hostile.py checks: for each file, what it is and the expected outcome on each
path that meets user files:

- "training": the pre-validation pass of a training run (`kiqa.data.validate`, whose
  `rejects.csv` lists each rejected image by name with the reason) and the tf.data
  pipeline over the images it keeps.
- "score": `kiqa score` over the image folder (one CSV row per file: a MOS or the reason).
- "serving": the SavedModel's `serving_default` bytes signature through the gRPC dev
  server, reached with `kiqa predict` over the same folder (the server answers
  INVALID_ARGUMENT for bytes it cannot use; links leaving the folder are refused by the
  client before anything is sent).

An expected outcome is "decoded" (and then, where a `reference` is given, the decoded
pixels must match the reference image decoded by the same function, i.e. upright, first
frame, 8-bit RGB) or "rejected" with a message matching `reason` (a case-insensitive
regular expression), and the path names the file. `None` means the case does not reach
that path (a CSV row is not a file in a folder).

`probe(...)` (run as `python tests/hostile_corpus.py probe ...`) sends every file through
the three paths in a fresh process and measures its peak memory; tests/test_hostile.py
runs it in a subprocess, so that a crash or a hang fails one test instead of pytest.

The PNG of 20000x20000 pixels is a real, valid PNG (TF would decode it to 1.2 GB), built
in a few milliseconds by repeating one deflate block of zero rows; the JPEG announcing
30000x30000 is a small real JPEG whose frame header was rewritten.
"""

import dataclasses
import io
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pandas as pd
from PIL import Image

EXIF_ORIENTATION = 0x0112
# A real PNG this size decodes to 20000 * 20000 * 3 bytes = 1.2 GB in TF (no size cap).
HUGE_PNG_SIZE = (20000, 20000)
# What the rewritten JPEG header announces: 900 MP, 2.7 GB as decoded RGB.
HUGE_JPEG_CLAIM = (30000, 30000)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Expected result of one file on one path.

    Attributes:
        decoded: True when the file must be decoded and used.
        reason: for rejections, a case-insensitive regex the message must match.
    """

    decoded: bool
    reason: str = ""

    def describe(self):
        return "decoded" if self.decoded else f"rejected /{self.reason}/"


DECODED = Outcome(True)


def rejected(reason):
    return Outcome(False, reason)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table.

    Attributes:
        name: the image_name in labels.csv (a file name in `images/`, or the hostile
            name itself for CSV-row cases).
        kind: what the file is.
        training, score, serving: expected `Outcome` per path (None: does not apply).
        reference: file in `references/` holding what a correct decode shows (lossless
            PNG), or None.
        tolerance: largest mean absolute difference (0..255 levels) from the reference
            (JPEG coding loss; 0 for lossless formats).
        sends_bytes: the file's bytes can be read and sent to a server as they are.
    """

    name: str
    kind: str
    training: Optional[Outcome]
    score: Optional[Outcome]
    serving: Optional[Outcome]
    reference: Optional[str] = None
    tolerance: float = 0.0
    sends_bytes: bool = True

    def expected(self, path):
        return getattr(self, path)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What `write_corpus` wrote.

    Attributes:
        root: the folder holding everything.
        images: the image folder (what a user would point training and scoring at).
        references: lossless PNGs of what decodable files must decode to.
        outside: a folder beside `images/` (targets of links that leave it).
        labels: a KonIQ-format CSV (download-file layout) listing every case.
        cases: the table.
    """

    root: Path
    images: Path
    references: Path
    outside: Path
    labels: Path
    cases: Tuple[Case, ...]

    def case(self, name):
        return next(c for c in self.cases if c.name == name)

    def files(self):
        """Cases that are files in `images/` (not CSV-row cases)."""
        return [c for c in self.cases if c.score is not None]

    def table(self):
        """The table as text, one line per case (for reports and failure messages)."""
        lines = [f"{'file':<22} {'kind':<44} {'training':<34} {'score':<34} serving"]
        for c in self.cases:
            cells = [(o.describe() if o else "n/a") for o in (c.training, c.score, c.serving)]
            lines.append(f"{c.name:<22} {c.kind:<44} {cells[0]:<34} {cells[1]:<34} {cells[2]}")
        return "\n".join(lines)


# Reasons, as the product words them (regexes).
EMPTY = r"empty \(0 bytes\)"
UNDECODABLE_JPEG = r"Invalid JPEG data"
# What the SavedModel says for the same files (a graph cannot catch TF's own message).
UNDECODABLE_SERVED = r"cannot decode the image \(the jpeg decoder refused its data\); the file is corrupt or truncated"
NOT_AN_IMAGE = r"format not recognised"
TIFF = r"TIFF, which TensorFlow cannot decode"
OVER_CAP = r"announces {w}x{h} = {p} pixels, over the cap"
LINK_TRAINING = r"outside the image folder"
LINK_SCORING = r"symbolic link to a file outside the given folders"
DOTDOT = r"'\.\.' is not allowed"
ABSOLUTE = r"absolute paths are not allowed"
ANIMATED_WEBP = r"animated WebP; kiqa scores still images only .*convert it to a still image"
UNREADABLE_GIF = r"GIF header is unreadable"
SHORT_JPEG = r"JPEG header announces {w}x{h} pixels, which need at least \d+ bytes of image data, but the file holds \d+"
# What TF's own decoders say about a header that disagrees with the data (they refuse it
# before or while decoding; kiqa cannot word these, nor can they name a batch item).
BAD_PNG = r"Invalid PNG data"
BAD_GIF = r"Invalid GIF data .*image EOF detected before image complete"
BAD_BMP = r"Input size should match"
BAD_WEBP = r"Failed to decode WebP"
DECODER_REASONS = (UNDECODABLE_JPEG, BAD_PNG, BAD_GIF, BAD_BMP, BAD_WEBP)
# Files that would cost the decoder far more than their size (issue 24).
TOO_MANY_SCANS = r"JPEG has \d+ scans, over the limit of \d+ .*re-encode it"
TOO_MANY_TEXT_CHUNKS = r"PNG has \d+ zTXt/iTXt text chunks, over the limit of \d+.*strip its metadata"
# The PNG text bomb: chunks of zlib-compressed zeros, each inflating to 8 MB (libpng's cap
# for one chunk): 40 x 8 MB = 320 MB and ~2 s of inflating in a 0.3 MB file.
TEXT_BOMB_CHUNKS, TEXT_BOMB_INFLATED = 40, 8_000_000
# The scan bomb: one scan of a progressive JPEG repeated this many times.
SCAN_BOMB_REPEATS = 2000
# Frames of the GIF frame bombs: 60 x 2400 x 2400 = 346 MP in one 290 KB file. Before
# kiqa cut GIFs after their first image, giflib held every frame (346 MB) at once.
BOMB_FRAMES, BOMB_SIZE = 60, 2400


def _photo(height, width, seed):
    """Smooth, asymmetric content with some texture (so a wrong turn or flip shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 127 / (height + width)], -1)
    base[height // 4 : height // 2, width // 5 : width // 3] = (250, 30, 30)  # a red block, top left
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_text_chunks(png, count, inflated=64, after_image=False, kind=b"zTXt"):
    """`png` with `count` compressed text chunks ("Comment", zlib-compressed zeros that
    inflate to `inflated` bytes each) before its first IDAT, or after its image data."""
    text = zlib.compress(bytes(inflated), 9)
    if kind == b"zTXt":
        data = b"Comment\x00\x00" + text
    elif kind == b"iTXt":  # keyword, NUL, compressed, method 0, no language, no translation
        data = b"Comment\x00\x01\x00\x00\x00" + text
    else:  # tEXt: plain text, nothing to inflate
        data = b"Comment\x00" + bytes(inflated)
    chunks = _png_chunk(kind, data) * count
    at = png.index(b"IEND" if after_image else b"IDAT") - 4
    return png[:at] + chunks + png[at:]


def jpeg_markers(jpeg):
    """Offsets of every marker from the first scan on (FF xx; not stuffing, fill or RSTn)."""
    offsets = []
    for i in range(jpeg.index(b"\xff\xda"), len(jpeg) - 1):
        if jpeg[i] == 0xFF and jpeg[i + 1] not in (0x00, 0xFF) and not 0xD0 <= jpeg[i + 1] <= 0xD7:
            offsets.append(i)
    return offsets


def scan_bomb(progressive_jpeg, repeats):
    """The progressive JPEG with its last scan (header and coded data, under the Huffman
    tables in force there) repeated `repeats` times more: libjpeg warns about the odd
    progression but decodes every copy over the whole image, so such files cost time
    in proportion to repeats x pixels (2.5 MB took 89 s in issue 24)."""
    *_, last_scan, end = jpeg_markers(progressive_jpeg)
    scan = progressive_jpeg[last_scan:end]
    return progressive_jpeg[:end] + scan * repeats + progressive_jpeg[end:]


def jpeg_with_segments(jpeg, comments=0, fill=0):
    """`jpeg` with `comments` empty COM segments and `fill` 0xFF fill bytes after SOI, all
    before the frame header: valid JPEG, which libjpeg (and so TF) decodes as the original."""
    return jpeg[:2] + b"\xff\xfe\x00\x02" * comments + b"\xff" * fill + jpeg[2:]


def huge_png(width, height):
    """A valid 8-bit RGB PNG of width x height black pixels, ~1 MB for 20000x20000.

    Every scanline is a filter byte and 3 * width zero bytes. One deflate block holding
    `rows_per_block` rows is compressed once, ended with a full flush (so it refers to
    nothing before it), and repeated; the zlib trailer's Adler-32 of n zero bytes is
    (n mod 65521) << 16 | 1, so nothing of the 1.2 GB is ever held in memory.
    """
    rows_per_block = 100
    assert height % rows_per_block == 0
    row = bytes(1 + 3 * width)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(row * rows_per_block) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty last block
    total = len(row) * height
    adler = ((total % 65521) << 16) | 1
    stream = b"\x78\xda" + block * (height // rows_per_block) + final + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def check_png_is_complete(path, chunk=64 * 1024 * 1024):
    """Verifies a PNG's CRCs and inflates its image data in bounded pieces.

    Returns:
        (width, height, number of decompressed bytes); raises ValueError or zlib.error
        when the file is not a valid PNG.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("no PNG signature")
    position, idat, width = 8, b"", None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    inflater, produced, pending = zlib.decompressobj(), 0, idat
    while pending:
        out = inflater.decompress(pending, chunk)
        produced += len(out)
        pending = inflater.unconsumed_tail
    produced += len(inflater.flush())
    if not inflater.eof:
        raise ValueError("image data stream is incomplete")
    return width, height, produced


def _jpeg_claiming(size, seed=0):
    """A small real JPEG whose SOF0 frame header announces `size` (height, width)."""
    data = bytearray(_encode(Image.fromarray(_photo(16, 16, seed)), "JPEG", quality=50))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", *size)
    return bytes(data)


def _corrupt_huffman_table(jpeg):
    """The first DHT segment's 16 code-length counts set to 255: libjpeg fails
    ("Bogus Huffman table definition") instead of decoding garbage."""
    data = bytearray(jpeg)
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def _corrupt_scan(jpeg, seed=0):
    """300 random bytes written into the entropy-coded data after the SOS header."""
    data = bytearray(jpeg)
    start = data.find(b"\xff\xda") + 200
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, 300, dtype=np.uint8)
    noise[noise == 0xFF] = 0x7F  # no stray markers: libjpeg then decodes through it
    data[start : start + 300] = noise.tobytes()
    return bytes(data)


# ----------------------------------------------------------------------------- frames, headers


def gif_blocks(data):
    """Splits a GIF into (header with logical screen and global colour table, blocks).

    Blocks are the extension and image blocks before the trailer, each with its
    sub-blocks and their terminator, as bytes.
    """
    flags = data[10]
    table = 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0
    pos, blocks = 13 + table, []
    while data[pos] != 0x3B:
        start = pos
        if data[pos] == 0x21:
            pos += 2
        else:
            local = data[pos + 9]
            pos += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
        while data[pos]:
            pos += 1 + data[pos]
        blocks.append(data[start : pos + 1])
        pos += 1
    return data[: 13 + table], blocks


def gif_image_block(image, local_table=True):
    """One GIF image block of a P-mode or RGB Pillow image, with its own colour table
    (local_table) or relying on the file's global one."""
    header, blocks = gif_blocks(_encode(image, "GIF"))
    block = bytearray(next(b for b in blocks if b[0] == 0x2C))
    if not local_table or block[9] & 0x80:
        return bytes(block)
    table = header[13:]
    block[9] = 0x80 | (block[9] & 0x40) | (header[10] & 7)  # keep the interlace bit
    return bytes(block[:10]) + table + bytes(block[10:])


def gif_comment(text):
    return b"\x21\xfe" + bytes([len(text)]) + text + b"\x00"


def gif_delay(hundredths=10):
    """A graphic control extension: what an animation puts before each frame."""
    return b"\x21\xf9\x04\x00" + hundredths.to_bytes(2, "little") + b"\x00\x00"


def gif_file(screen, blocks):
    """A GIF89a with a (width, height) logical screen, no global table, and `blocks`."""
    head = b"GIF89a" + screen[0].to_bytes(2, "little") + screen[1].to_bytes(2, "little") + b"\x00\x00\x00"
    return head + b"".join(blocks) + b";"


def gif_frame_bomb(width, height, frames, first=None):
    """An animated GIF of `frames` one-colour frames of width x height (a few KB each:
    LZW codes a flat frame in ~1 byte per 1000 pixels), each with its own colour table
    and delay, after an optional different `first` image (a Pillow image). giflib
    decodes every frame: 60 frames of 2400x2400 are 346 MP, over five times the cap."""
    flat = Image.new("P", (width, height), 0)
    blocks = []
    for index in range(frames):
        flat.putpalette([40 + index % 200, 128, 200 - index % 200] * 2)
        blocks += [gif_delay(), gif_image_block(flat)]
    if first is not None:
        blocks = [gif_delay(), gif_comment(b"first frame"), gif_image_block(first)] + blocks
    return gif_file((width, height), blocks)


def animated(frames, fmt, **options):
    """An animated file (Pillow's save_all) of a list of Pillow images."""
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)


def claiming(data, width, height):
    """The same file with the size in its header rewritten (checksums kept valid):
    JPEG's SOF0/SOF2, PNG's IHDR (CRC fixed), GIF's first image descriptor, BMP's
    info header, WebP's VP8L, VP8 or VP8X canvas. The data stays what it was."""
    data = bytearray(data)
    if data[:2] == b"\xff\xd8":
        sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    elif data[:4] == b"\x89PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif data[:3] == b"GIF":
        header, blocks = gif_blocks(bytes(data))
        image = len(header) + sum(len(b) for b in blocks[: next(i for i, b in enumerate(blocks) if b[0] == 0x2C)])
        data[image + 5 : image + 9] = struct.pack("<HH", width, height)
    elif data[:2] == b"BM":
        data[18:26] = struct.pack("<ii", width, height)
    elif data[12:16] == b"VP8L":
        bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
        data[21:25] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    elif data[12:16] == b"VP8 ":
        data[26:30] = struct.pack("<HH", width, height)
    elif data[12:16] == b"VP8X":
        data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    else:
        raise ValueError("not a JPEG, PNG, GIF, BMP or WebP")
    return bytes(data)


def write_corpus(folder):
    """Writes every hostile file of issue 8 (and two good controls) into `folder`.

    Args:
        folder: an empty or missing folder.

    Returns:
        A `Corpus`.
    """
    root = Path(folder)
    images, references, outside = root / "images", root / "references", root / "outside"
    for sub in (images, references, outside):
        sub.mkdir(parents=True, exist_ok=True)

    def reference(name, pixels):
        Image.fromarray(pixels).save(references / name)
        return name

    def write(name, contents):
        (images / name).write_bytes(contents)

    photo = _photo(96, 128, seed=1)
    good_jpeg = _encode(Image.fromarray(photo), "JPEG", quality=92)
    ref_photo = reference("photo.png", photo)
    cases = []

    write("good.jpg", good_jpeg)
    cases.append(Case("good.jpg", "control: plain RGB JPEG", DECODED, DECODED, DECODED, ref_photo, 3.0))
    write("good.png", _encode(Image.fromarray(photo), "PNG"))
    cases.append(Case("good.png", "control: plain RGB PNG", DECODED, DECODED, DECODED, ref_photo, 0.0))

    write("empty.jpg", b"")
    cases.append(Case("empty.jpg", "zero-byte file", *[rejected(EMPTY)] * 3))

    write("truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    cases.append(Case("truncated.jpg", "JPEG cut in half (header intact)", *[rejected(UNDECODABLE_JPEG)] * 2,
                      rejected(UNDECODABLE_SERVED)))

    write("corrupt.jpg", _corrupt_huffman_table(good_jpeg))
    cases.append(Case("corrupt.jpg", "corrupt JPEG: bogus Huffman table", *[rejected(UNDECODABLE_JPEG)] * 2,
                      rejected(UNDECODABLE_SERVED)))

    # libjpeg recovers from damaged entropy-coded data (a warning, not an error), as
    # Pillow and browsers do: the image decodes with a damaged region. Not rejectable
    # from the bytes; the test checks it decodes to the right size without harm.
    write("corrupt-scan.jpg", _corrupt_scan(good_jpeg))
    cases.append(Case("corrupt-scan.jpg", "corrupt JPEG: noise in the scan data", DECODED, DECODED, DECODED))

    (images / "notes.jpg").write_text("these are meeting notes, saved with a .jpg name\n")
    cases.append(Case("notes.jpg", "text file with a .jpg name", *[rejected(NOT_AN_IMAGE)] * 3))

    write("scan.tiff", _encode(Image.fromarray(photo), "TIFF"))
    cases.append(Case("scan.tiff", "TIFF", *[rejected(TIFF)] * 3))

    cmyk = Image.fromarray(photo).convert("CMYK")
    write("cmyk.jpg", _encode(cmyk, "JPEG", quality=95))
    ref_cmyk = reference("cmyk.png", np.asarray(cmyk.convert("RGB")))
    cases.append(Case("cmyk.jpg", "CMYK JPEG", DECODED, DECODED, DECODED, ref_cmyk, 3.0))

    grey = np.asarray(Image.fromarray(photo).convert("L"))
    sixteen = grey.astype(np.uint16) * 257  # 8-bit grey spread over 16 bits, exactly
    write("grey16.png", _encode(Image.fromarray(sixteen), "PNG"))
    ref_grey = reference("grey.png", np.stack([grey] * 3, -1))
    cases.append(Case("grey16.png", "16-bit greyscale PNG", DECODED, DECODED, DECODED, ref_grey, 0.0))

    write("grey.jpg", _encode(Image.fromarray(grey), "JPEG", quality=95))
    cases.append(Case("grey.jpg", "greyscale (1-channel) JPEG", DECODED, DECODED, DECODED, ref_grey, 3.0))

    frames = [Image.fromarray(photo).quantize(64), Image.fromarray(255 - photo).quantize(64)]
    write("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100))
    ref_gif = reference("gif-frame0.png", np.asarray(frames[0].convert("RGB")))
    cases.append(Case("animated.gif", "animated GIF, 2 frames (first one is used)", DECODED, DECODED, DECODED, ref_gif, 0.0))

    # Animated GIFs whose frames together are far over the pixel cap (issue 12): only
    # the first image is decoded, whatever follows it.
    write("frame-bomb.gif", gif_frame_bomb(BOMB_SIZE, BOMB_SIZE, BOMB_FRAMES))
    ref_flat = reference("bomb-frame0.png", np.full((24, 24, 3), (40, 128, 200), np.uint8))
    cases.append(Case("frame-bomb.gif", f"animated GIF frame bomb: {BOMB_FRAMES} frames of {BOMB_SIZE}x{BOMB_SIZE}",
                      DECODED, DECODED, DECODED, ref_flat, 0.0))
    write("bomb-after-photo.gif", gif_frame_bomb(BOMB_SIZE, BOMB_SIZE, BOMB_FRAMES // 2, first=frames[0]))
    cases.append(Case("bomb-after-photo.gif", "animated GIF: a photo, then larger frames with local colour tables",
                      DECODED, DECODED, DECODED, ref_gif, 0.0))
    three = frames + [Image.fromarray(photo[::-1]).quantize(64)]
    write("cut-last-frame.gif", animated(three, "GIF")[:-300])
    cases.append(Case("cut-last-frame.gif", "animated GIF with its last frame truncated",
                      DECODED, DECODED, DECODED, ref_gif, 0.0))
    write("no-frames.gif", gif_file((96, 128), [gif_comment(b"nothing here")]))
    cases.append(Case("no-frames.gif", "GIF with no image (zero frames)", *[rejected(UNREADABLE_GIF)] * 3))
    write("moving.webp", animated([Image.fromarray(photo), Image.fromarray(255 - photo)], "WEBP", lossless=True))
    cases.append(Case("moving.webp", "animated WebP (lossless, 2 frames)", *[rejected(ANIMATED_WEBP)] * 3))
    write("moving-alpha.webp", animated([Image.fromarray(photo).convert("RGBA"), Image.fromarray(255 - photo).convert("RGBA")],
                                        "WEBP", quality=80))
    cases.append(Case("moving-alpha.webp", "animated WebP (lossy with alpha, 2 frames)", *[rejected(ANIMATED_WEBP)] * 3))
    write("moving.png", animated([Image.fromarray(photo), Image.fromarray(255 - photo)], "PNG"))
    cases.append(Case("moving.png", "animated PNG (APNG, 2 frames: the default image is used)",
                      DECODED, DECODED, DECODED, ref_photo, 0.0))

    # Headers rewritten to disagree with the data (issue 12, item 7).
    h, w = 7999, 7999
    write("claims-7999.jpg", claiming(good_jpeg, w, h))
    short = rejected(SHORT_JPEG.format(w=w, h=h))
    cases.append(Case("claims-7999.jpg", f"JPEG of 128x96 whose header claims {w}x{h}", short, short, short))
    progressive = _encode(Image.fromarray(photo), "JPEG", quality=92, progressive=True)
    write("claims-4000.jpg", claiming(progressive, 4000, 3000))
    short = rejected(SHORT_JPEG.format(w=4000, h=3000))
    cases.append(Case("claims-4000.jpg", "progressive JPEG of 128x96 whose header claims 4000x3000", short, short, short))
    upright_exif = Image.Exif()
    upright_exif[EXIF_ORIENTATION] = 1  # any EXIF makes Pillow write an extended (VP8X) WebP
    for name, data, reason in [
        ("claims-5000.png", _encode(Image.fromarray(photo), "PNG"), BAD_PNG),
        ("claims-64.png", claiming(_encode(Image.fromarray(photo), "PNG"), 64, 48), BAD_PNG),
        ("claims-5000.gif", _encode(frames[0], "GIF"), BAD_GIF),
        ("claims-5000.bmp", _encode(Image.fromarray(photo), "BMP"), BAD_BMP),
        ("claims-64.bmp", claiming(_encode(Image.fromarray(photo), "BMP"), 64, 48), BAD_BMP),
        ("claims-5000.webp", _encode(Image.fromarray(photo), "WEBP", lossless=True), BAD_WEBP),
        ("claims-5000x.webp", _encode(Image.fromarray(photo), "WEBP", quality=80, exif=upright_exif.tobytes()), BAD_WEBP),
    ]:
        size = name.split("-")[1].split(".")[0].rstrip("x")
        if size == "5000":
            data = claiming(data, 5000, 5000)
        write(name, data)
        fmt = name.split(".")[1].upper()
        cases.append(Case(name, f"{fmt} of 128x96 whose header claims {size} pixels wide", *[rejected(reason)] * 3))

    # Files that cost the decoder far more than their size (issue 24), and valid files
    # the header walk once gave up on (issue 24, 7a).
    good_png = _encode(Image.fromarray(photo), "PNG")
    write("text-bomb.png", png_with_text_chunks(good_png, TEXT_BOMB_CHUNKS, TEXT_BOMB_INFLATED))
    cases.append(Case("text-bomb.png", f"PNG text bomb: {TEXT_BOMB_CHUNKS} zTXt chunks inflating to 8 MB each",
                      *[rejected(TOO_MANY_TEXT_CHUNKS)] * 3))
    write("text-after-image.png", png_with_text_chunks(good_png, 20, after_image=True, kind=b"iTXt"))
    cases.append(Case("text-after-image.png", "PNG with 20 compressed iTXt chunks after its image data",
                      *[rejected(TOO_MANY_TEXT_CHUNKS)] * 3))
    write("some-text.png", png_with_text_chunks(png_with_text_chunks(good_png, 8), 100, kind=b"tEXt"))
    cases.append(Case("some-text.png", "PNG with 8 zTXt and (control) 100 tEXt chunks", DECODED, DECODED, DECODED,
                      ref_photo, 0.0))
    progressive_photo = _encode(Image.fromarray(photo), "JPEG", quality=92, progressive=True)
    # A flat 2048x1536 image: its scans are a few bytes each, as in the bomb.
    flat = _encode(Image.new("RGB", (2048, 1536), (90, 140, 60)), "JPEG", quality=90, progressive=True)
    write("scan-bomb.jpg", scan_bomb(flat, SCAN_BOMB_REPEATS))
    cases.append(Case("scan-bomb.jpg", f"progressive JPEG scan bomb: 2048x1536, its last scan repeated "
                      f"{SCAN_BOMB_REPEATS} times", *[rejected(TOO_MANY_SCANS)] * 3))
    write("progressive.jpg", progressive_photo)
    cases.append(Case("progressive.jpg", "control: plain progressive JPEG (10 scans)", DECODED, DECODED, DECODED,
                      ref_photo, 3.0))
    write("comments.jpg", jpeg_with_segments(good_jpeg, comments=3000, fill=20000))
    cases.append(Case("comments.jpg", "valid JPEG with 3000 comment segments and 20000 fill bytes before its frame",
                      DECODED, DECODED, DECODED, ref_photo, 3.0))

    write("photo.webp", _encode(Image.fromarray(photo), "WEBP", lossless=True))
    cases.append(Case("photo.webp", "lossless WebP", DECODED, DECODED, DECODED, ref_photo, 0.0))

    # Stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to view), as
    # phones write portrait photos.
    upright = _photo(128, 96, seed=2)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    write("rotated.jpg", _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    ref_upright = reference("upright.png", upright)
    cases.append(Case("rotated.jpg", "EXIF orientation 6 (portrait stored landscape)", DECODED, DECODED, DECODED, ref_upright, 3.0))

    h, w = HUGE_JPEG_CLAIM
    write("claims-30000.jpg", _jpeg_claiming(HUGE_JPEG_CLAIM))
    over = rejected(OVER_CAP.format(w=w, h=h, p=w * h))
    cases.append(Case("claims-30000.jpg", f"{len(_jpeg_claiming(HUGE_JPEG_CLAIM))}-byte JPEG announcing {w}x{h}", over, over, over))

    h, w = HUGE_PNG_SIZE
    write("huge.png", huge_png(w, h))
    over = rejected(OVER_CAP.format(w=w, h=h, p=w * h))
    size_mb = (images / "huge.png").stat().st_size / 1e6
    cases.append(Case("huge.png", f"real {w}x{h} PNG ({size_mb:.1f} MB; 1.2 GB decoded)", over, over, over))

    os.symlink("/dev/zero", images / "zero.jpg")
    cases.append(Case(
        "zero.jpg", "symbolic link to /dev/zero",
        rejected(LINK_TRAINING), rejected(LINK_SCORING), rejected(LINK_SCORING), sends_bytes=False,
    ))

    secret = _photo(64, 64, seed=3)
    Image.fromarray(secret).save(outside / "private.png")
    os.symlink(outside / "private.png", images / "link-out.png")
    cases.append(Case(
        "link-out.png", "symbolic link to an image outside the folder",
        rejected(LINK_TRAINING), rejected(LINK_SCORING), rejected(LINK_SCORING), sends_bytes=False,
    ))

    # CSV rows naming files outside the image folder; the files exist, so only the
    # name check can stop them.
    Image.fromarray(secret).save(root / "escape.png")
    cases.append(Case("../escape.png", "labels.csv row with '../'", rejected(DOTDOT), None, None, sends_bytes=False))
    cases.append(Case(str(outside / "private.png"), "labels.csv row with an absolute path",
                      rejected(ABSOLUTE), None, None, sends_bytes=False))

    labels = root / "labels.csv"
    pd.DataFrame({
        "image_name": [c.name for c in cases],
        "MOS_zscore": np.linspace(20, 80, len(cases)).round(2),
    }).to_csv(labels, index=False)
    return Corpus(root, images, references, outside, labels, tuple(cases))


# ----------------------------------------------------------------------------- the probe


def _status_kb(field):
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M).group(1))


def _reset_peak():
    """Resets VmHWM to the current RSS (Linux; needs write access to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def probe(folder, run_dir, base_path, image_size):
    """Runs every corpus file through the three paths in this (fresh) process and
    measures memory. Meant to run in a subprocess (`python hostile_corpus.py probe ...`):
    a crash then fails one test instead of killing pytest, a hang is ended by the
    subprocess timeout, and the measurement starts from a clean process.

    TF keeps freed tensor memory for reuse (measured: RSS stays at 1.7 GB after a 950 MB
    tensor is freed), so growth measured in a long-running process can hide an
    allocation that reuses memory an earlier one left; in a fresh process whose warm-up
    only decoded small images, the peak over the whole run minus the resident set after
    warm-up bounds what any one hostile file cost.

    Args:
        folder: where to write the corpus.
        run_dir: a run directory (the model `kiqa score` uses).
        base_path: an export base path of the same model (served over gRPC here).
        image_size: (height, width) of the model.

    Returns:
        dict: "per_file" {"path/file": peak growth in MB}, "baseline_mb" (RSS after
        warm-up), "overall_growth_mb" (highest peak over the run minus the baseline),
        "control_mb" (growth while decoding a 5000x4000 PNG, 60 MB: the measure works),
        "exact" (VmHWM could be reset).
    """
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    from kiqa.config import TrainConfig
    from kiqa.data import koniq
    from kiqa.data.pipeline import make_dataset
    from kiqa.data.validate import find_bad_images
    from kiqa.serving.devserver import DevServer
    from kiqa.image import read_image_bytes
    from kiqa.scoring.scorer import load_scorer
    from kiqa.scoring.table import score_files

    corpus = write_corpus(folder)
    config = TrainConfig.demo(weights="none", image_size=tuple(image_size), cache="none", batch_size=8)
    frame = koniq.read_labels(corpus.labels)
    scorer = load_scorer(run_dir)
    out_csv = Path(folder) / "scores.csv"
    files = [c for c in corpus.files() if c.sends_bytes]

    def predict(stub, contents):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=Path(base_path).name))
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(contents, dtype=tf.string, shape=[len(contents)]))
        try:
            return stub.Predict(request, timeout=120).outputs["mos"].float_val
        except grpc.RpcError as err:
            return err.code().name

    def through_pipeline(paths):
        return list(make_dataset(paths, np.zeros(len(paths)), config, training=False, with_index=True))

    peaks, per_file = [], {}

    def measure(key, function, *args):
        exact = _reset_peak()
        before = _status_kb("VmRSS")
        function(*args)
        peak = _status_kb("VmHWM" if exact else "VmRSS")
        peaks.append(peak)
        per_file[key] = (peak - before) / 1024
        return exact

    # Warm-up replays of the export are not needed: the first request below traces.
    server = DevServer(base_path, port=0, warmup=False)
    with server, grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        good = [str(corpus.images / "good.jpg"), str(corpus.images / "good.png")]
        # Warm-up: scoring and serving traced on good files, so tracing is not counted
        # (each tf.data pass traces its own graph: counted, a few MB).
        score_files([(p, None) for p in good], scorer, out_csv, skip_existing=False, progress=False)
        predict(stub, [read_image_bytes(good[0])])
        # The control first: later large decodes leave freed heap that malloc hands out
        # again (measured: after the GIF frame bombs, the 60 MB decode showed 0 MB).
        control = huge_png(5000, 4000)
        exact = measure("control/5000x4000 PNG decoded (60 MB)", lambda: tf.io.decode_png(control).shape)
        peaks.clear()
        baseline = _status_kb("VmRSS")

        # One file at a time first, so each is measured before the whole-corpus passes
        # have grown the heap; the highest peak of the run bounds them all regardless.
        for case in files:
            path = corpus.images / case.name
            measure(f"score/{case.name}", score_files, [(str(path), None)], scorer, out_csv, 16, False, False)
            measure(f"serving/{case.name}", predict, stub, [read_image_bytes(path)])
        measure("training/pre-validation of the whole corpus", find_bad_images, frame, corpus.images, config, False)
        measure("training/pipeline over every readable file", through_pipeline,
                [str(corpus.images / c.name) for c in files])

    overall = (max(peaks) - baseline) / 1024
    return {
        "per_file": per_file,
        "baseline_mb": baseline / 1024,
        "overall_growth_mb": overall,
        "control_mb": per_file["control/5000x4000 PNG decoded (60 MB)"],
        "exact": exact,
    }


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 7 or sys.argv[1] != "probe":
        sys.exit("usage: hostile_corpus.py probe FOLDER RUN_DIR BASE_PATH HEIGHT,WIDTH OUT_JSON")
    _, _, folder, run_dir, base_path, size, out_json = sys.argv
    result = probe(folder, run_dir, base_path, [int(v) for v in size.split(",")])
    Path(out_json).write_text(json.dumps(result, indent=2))
