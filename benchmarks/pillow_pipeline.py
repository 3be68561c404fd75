"""Pillow reference input pipeline for benchmarks/run.py (stock Pillow or Pillow-SIMD).

Run by run.py as a child process, under the benchmark's own Python (stock Pillow) or
under another interpreter that has Pillow-SIMD (`--pillow-simd-python`); Pillow-SIMD
replaces the `PIL` package, so the two cannot share one environment. It needs only
Pillow and NumPy. One JSON command per stdin line, one JSON reply line on stdout.

The work per image is what `kiqa.image.decode_image` does for a JPEG: decode with draft
mode (libjpeg's DCT-domain downscale to the smallest scale still covering the target,
the fast path Pillow-SIMD's authors recommend), turn by the EXIF orientation, resize
with Pillow's antialiased bilinear filter when the draft is not already the target
size, and hand over float32 [height, width, 3] pixels. Images come from memory, so the
numbers are decode cost, not disk speed.
"""

import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL
from PIL import Image, ImageOps, features


def load(contents, size):
    height, width = size
    image = Image.open(io.BytesIO(contents))
    # EXIF orientations 5-8 turn the image by 90 degrees: draft on the stored axes.
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    image.draft("RGB", (height, width) if turned else (width, height))
    image = ImageOps.exif_transpose(image.convert("RGB"))
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


class Runner:
    def __init__(self):
        self.blobs = []
        self.pool = None

    def info(self, _):
        simd = "post" in PIL.__version__ or hasattr(Image, "SIMD")
        return {
            "pillow_version": PIL.__version__,
            "pillow_simd": bool(simd),
            "libjpeg_turbo": features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None,
            "python": sys.version.split()[0],
        }

    def files(self, command):
        self.blobs = []
        for path in command["paths"]:
            with open(path, "rb") as handle:
                self.blobs.append(handle.read())
        return {"files": len(self.blobs)}

    def run(self, command):
        threads, count, size = command["threads"], command["count"], tuple(command["size"])
        if self.pool is None or self.pool._max_workers != threads:
            self.pool = ThreadPoolExecutor(threads)
        work = [self.blobs[i % len(self.blobs)] for i in range(count)]
        shape = None
        wall, cpu = time.perf_counter(), time.process_time()
        for image in self.pool.map(lambda contents: load(contents, size), work):
            shape = image.shape
        return {
            "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
            "images": count,
            "shape": list(shape),
        }


def main():
    runner = Runner()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply = getattr(runner, command["cmd"])(command)
        except Exception as err:  # reported to run.py, which records it and goes on
            reply = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
