"""Input-pipeline time of one training epoch: decoding JPEG files vs reading prepared shards.

Not a test. It writes kiqa's demo data at KonIQ's own file size (1024x768 JPEGs, so the
decode cost per image is KonIQ's), prepares it once with `kiqa.data.prepared`, then times
full passes of the training input pipeline at 384x512 (shuffle, flips, batching; no
model) from both sources: `kiqa.data.pipeline.make_dataset` on the files and
`Prepared.dataset` on the shards. Each source gets one untimed warm-up epoch (graph
tracing, OS page cache), then `--repeats` timed epochs; medians are reported.

    .venv/bin/python benchmarks/prepared_epoch.py            # table + benchmarks/results/*.json
    .venv/bin/python benchmarks/prepared_epoch.py --crops 1  # quicker (176 images)

On a shared machine the numbers move with other people's load; the JSON records the load
average before and after.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kiqa  # noqa: E402
from kiqa.config import TrainConfig  # noqa: E402
from kiqa.data import koniq, prepared, synthetic  # noqa: E402
from kiqa.data.pipeline import make_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=2,
                        help="demo crops per sample photo: 11 x 16 x crops images (default 2: 352)")
    parser.add_argument("--file-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"),
                        help="size of the JPEG files written (default KonIQ's 768 1024)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"),
                        help="training resolution (default 384 512)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per source (median reported)")
    parser.add_argument("--labels", help="use this KonIQ-format label file instead of writing demo data")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON result")
    return parser.parse_args(argv)


def epoch_seconds(dataset):
    """Wall time of one full pass; returns (seconds, images)."""
    start = time.perf_counter()
    count = 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return time.perf_counter() - start, count


def time_source(name, dataset, repeats):
    warmup, count = epoch_seconds(dataset)
    print(f"  {name}: warm-up epoch {warmup:.2f} s ({count} images)", file=sys.stderr)
    times = []
    for i in range(repeats):
        seconds, _ = epoch_seconds(dataset)
        times.append(seconds)
        print(f"  {name}: epoch {i + 1}/{repeats} {seconds:.2f} s", file=sys.stderr)
    median = statistics.median(times)
    return {"warmup_seconds": warmup, "epoch_seconds": times, "median_seconds": median,
            "images": count, "images_per_second": count / median}


def main(argv=None):
    args = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kiqa-bench-") as scratch:
        scratch = Path(scratch)
        if args.labels:
            labels = Path(args.labels)
            root = koniq.default_image_root(labels)
        else:
            print(f"writing demo data ({11 * 16 * args.crops} JPEGs at {args.file_size[0]}x{args.file_size[1]})",
                  file=sys.stderr)
            labels = synthetic.write_demo_dataset(scratch / "demo", crops_per_photo=args.crops,
                                                  size=tuple(args.file_size))
            root = labels.parent / "images"
        frame = koniq.read_labels(labels)
        paths = [str(root / name) for name in frame.image_name]
        config = TrainConfig.demo(image_size=tuple(args.image_size), batch_size=args.batch_size,
                                  cache="none", hflip=True)

        print("preparing shards", file=sys.stderr)
        start = time.perf_counter()
        out = prepared.prepare_dataset(frame, root, config, scratch / "prepared", progress=False)
        prepare_seconds = time.perf_counter() - start
        store = prepared.open_prepared(out, config)
        shard_bytes = sum(p.stat().st_size for p in out.glob("*.tfrecord"))
        jpeg_bytes = sum(os.path.getsize(p) for p in paths)

        print("timing epochs", file=sys.stderr)
        jpeg = time_source("JPEG files", make_dataset(paths, frame.mos, config, training=True), args.repeats)
        shards = time_source(
            "prepared shards", store.dataset(frame.image_name, frame.mos, config, training=True), args.repeats
        )
    ratio = jpeg["median_seconds"] / shards["median_seconds"]

    result = {
        "benchmark": "prepared_epoch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "kiqa": kiqa.__version__,
        },
        "settings": {
            "images": len(frame), "file_size": list(args.file_size), "image_size": list(args.image_size),
            "batch_size": args.batch_size, "repeats": args.repeats, "labels": str(args.labels or "demo"),
            "pipeline": "training=True: shuffle, horizontal flips, batching; no model",
        },
        "prepare_seconds": prepare_seconds,
        "disk_bytes": {"jpeg_files": jpeg_bytes, "prepared_shards": shard_bytes},
        "jpeg_files": jpeg,
        "prepared_shards": shards,
        "ratio_jpeg_over_prepared": ratio,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"prepared_epoch-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\none training epoch's input pipeline, {len(frame)} images "
          f"{args.file_size[0]}x{args.file_size[1]} JPEG -> {args.image_size[0]}x{args.image_size[1]}, "
          f"batch {args.batch_size}, median of {args.repeats}")
    print(f"{'source':<18}{'epoch s':>10}{'images/s':>12}{'disk MB':>10}")
    for name, row, size in (("JPEG files", jpeg, jpeg_bytes), ("prepared shards", shards, shard_bytes)):
        print(f"{name:<18}{row['median_seconds']:>10.2f}{row['images_per_second']:>12.1f}{size / 1e6:>10.1f}")
    print(f"\nprepared is {ratio:.1f}x faster per epoch; preparing once took {prepare_seconds:.1f} s "
          f"(load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
