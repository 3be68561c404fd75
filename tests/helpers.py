"""Small builders shared by tests (not product options)."""

import fcntl
import json
import os
import shutil

import keras
import numpy as np
import pandas as pd

from kiqa.serving import export, warmup
from kiqa.config import TrainConfig
from kiqa.data import synthetic
from kiqa.model import build_model

# Image size of the tiny exported model shared by the export, client and server tests.
EXPORT_SIZE = (32, 48)


def demo_subset(folder, per_source=4, crops_per_photo=1, seed=0):
    """Writes the demo data and a label CSV with a few images per source photo.

    Returns:
        Path of the subset CSV (images resolve through its `images/` folder).
    """
    labels = synthetic.write_demo_dataset(folder / "demo", crops_per_photo=crops_per_photo, seed=seed)
    frame = pd.read_csv(labels)
    subset = frame.groupby("source_image").sample(n=per_source, random_state=seed).sort_index()
    path = labels.parent / f"subset{per_source}.csv"
    subset.to_csv(path, index=False)
    return path


def make_tiny_run(run_dir, seed=0, head_scale=1.0, head="regression"):
    """A run directory (model.keras + config.json) holding a tiny-backbone kiqa model.

    Args:
        run_dir: folder to create.
        seed: weight initialisation seed.
        head_scale: multiplies the head's kernel; a random head moves scores by ~0.01 MOS
            between images, so tests that compare scores scale it until they differ by points
            (the distribution head's kernel starts 100x smaller still).
        head: `TrainConfig.head`: "regression", or "distribution" (mos, mos_sd and dist).

    Returns:
        The model.
    """
    config = TrainConfig.demo(weights="none", image_size=EXPORT_SIZE, head=head)
    keras.utils.set_random_seed(seed)
    image = keras.Input((None, None, 3))
    features = keras.layers.Rescaling(1 / 255.0)(image)
    features = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(features)
    model = build_model(config, backbone=keras.Model(image, features))
    head = model.get_layer("head_dense")
    head.kernel.assign(head.kernel * head_scale)
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    config.save(run_dir / "config.json")
    return model


def session_cache(tmp_path_factory, name, build):
    """A folder built once per test session and shared by every pytest-xdist worker.

    Each xdist worker is a separate process with its own basetemp inside the session's
    (`pytest-N/popen-gw0`), so a module- or session-scoped fixture builds its data once per
    worker. Here the first worker to ask builds the folder in the session's directory under
    an exclusive file lock; the others wait for it and reuse it. A build that raised leaves
    no completion mark, so the next caller starts it over.

    Args:
        tmp_path_factory: pytest's session fixture.
        name: the folder's name (one per kind of shared data).
        build: called with the empty folder to fill it.

    Returns:
        Path of the filled folder. Tests that change what is in it must copy it first.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "kiqa-session-cache"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.complete"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def shared_export(tmp_path_factory, head_scale=1.0):
    """(run dir, base path) of the tiny model exported once per session for all workers.

    Args:
        tmp_path_factory: pytest's session fixture.
        head_scale: `make_tiny_run`'s; 300 gives scores and maps that differ by points
            between images (the run is `make_tiny_run(run, head_scale=head_scale)`, seed 0).
    """
    def build(folder):
        make_tiny_run(folder / "run", head_scale=head_scale)
        export.export_model(folder / "run", base_path=folder / "kiqa")

    folder = session_cache(tmp_path_factory, f"export-x{head_scale:g}", build)
    return folder / "run", folder / "kiqa"


def collect(dataset):
    """All batches of a kiqa pipeline as (images, mos, index or None) arrays."""
    images, mos, index = [], [], []
    for features, targets in dataset:
        if isinstance(features, dict):
            index.append(features["index"].numpy())
            features = features["image"]
        images.append(features.numpy())
        mos.append(targets["mos"].numpy())
    return np.concatenate(images), np.concatenate(mos), (np.concatenate(index) if index else None)


def _encoded(pixels, fmt, **options):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image = pixels if hasattr(pixels, "save") else Image.fromarray(pixels)
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(height=40, width=56, seed=0):
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def good_image_kinds():
    """{kind: encoded bytes} of unusual files every path must decode."""
    from PIL import Image

    photo = _photo()
    frames = [Image.fromarray(photo).quantize(32), Image.fromarray(255 - photo).quantize(32)]
    return {
        "jpeg": _encoded(photo, "JPEG", quality=90),
        "png": _encoded(photo, "PNG"),
        "cmyk-jpeg": _encoded(Image.fromarray(photo).convert("CMYK"), "JPEG"),
        "grey16-png": _encoded(Image.fromarray(photo[..., 0].astype(np.uint16) * 257), "PNG"),
        "palette-png": _encoded(frames[0], "PNG"),
        "animated-gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encoded(photo, "BMP"),
        "webp": _encoded(photo, "WEBP", lossless=True),
    }


def bad_image_kinds():
    """{kind: encoded bytes} of files no path may score: every way we know a file is bad."""
    import struct
    import zlib

    photo = _photo()
    jpeg, png = _encoded(photo, "JPEG", quality=90), _encoded(photo, "PNG")
    gif, bmp, webp = _encoded(photo, "GIF"), _encoded(photo, "BMP"), _encoded(photo, "WEBP")
    sof = jpeg.find(b"\xff\xc0")
    jpeg_bomb = jpeg[: sof + 5] + struct.pack(">HH", 30000, 30000) + jpeg[sof + 9 :]
    dht = jpeg.find(b"\xff\xc4")
    bad_huffman = jpeg[: dht + 5] + b"\xff" * 16 + jpeg[dht + 21 :]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    png_bomb = b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    small_ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0))
    png_bad_idat = b"\x89PNG\r\n\x1a\n" + small_ihdr + chunk(b"IDAT", b"not zlib data at all") + chunk(b"IEND", b"")
    bmp_bomb = bmp[:18] + struct.pack("<ii", 30000, 30000) + bmp[26:]
    return {
        "zero-bytes": b"",
        "text": b"these are meeting notes, saved with a .jpg name\n",
        "html": b"<!doctype html><html><body>404 Not Found</body></html>",
        "random-bytes": np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "zip": b"PK\x03\x04" + b"\x00" * 60,
        "tiff": _encoded(photo, "TIFF"),
        "jpeg-xl": b"\xff\x0a" + b"\x00" * 40,
        "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "jpeg-header-only": jpeg[: sof + 19],
        "jpeg-soi-only": b"\xff\xd8\xff",
        "bad-huffman-jpeg": bad_huffman,
        "jpeg-header-bomb": jpeg_bomb,
        "truncated-png": png[: len(png) // 2],
        "png-header-only": png[:33],
        "png-bad-idat": png_bad_idat,
        "png-header-bomb": png_bomb,
        "wrong-magic-png": b"\x89PNX" + png[4:],
        "truncated-gif": gif[: len(gif) // 3],
        "gif-magic-garbage": b"GIF89a" + b"\xff" * 40,
        "truncated-bmp": bmp[: len(bmp) // 3],
        "bmp-header-bomb": bmp_bomb,
        "truncated-webp": webp[: len(webp) // 2],
        "webp-garbage": b"RIFF\x40\x00\x00\x00WEBPVP8 " + b"\x07" * 60,
    }


def write_generated_images(folder, count, seed=0):
    """Writes `count` of the export's generated photos into `folder`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, contents in warmup.generated_images(count, seed=seed):
        (folder / name).write_bytes(contents)
        names.append(name)
    return names


def send_json(handler, code, payload):
    """Answers an `http.server` request with `payload` as JSON (the REST stand-ins)."""
    data = json.dumps(payload).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
