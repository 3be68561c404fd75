"""The Beam pipeline (DirectRunner, 1 and 2 worker processes) against `kiqa score`.

Same files, same model, same machine, in one run; every job is a fresh process, timed
from start to exit (import, model load, listing, decoding, scoring, writing), on N
images and on a few, so start-up and the per-image rate are told apart. CPU time is the
job's own and its children's (Beam's SDK worker processes), from `os.wait4`.

    python benchmarks/beam_score.py                 # 500 KonIQ-size JPEGs, tiny model
    python benchmarks/beam_score.py --model export/kiqa --images 200

Images: 1024x768 JPEGs (KonIQ's size) made from the real 1024x768 KonIQ photos in
../shared/data/realset (each copy shifted and re-encoded at another quality, so no two
files are equal), or generated gradients and noise when those photos are absent.
Model: by default a tiny convolutional model at 384x512 (decoding dominates, so the
table shows what the pipeline itself costs); `--model` takes any model `kiqa score` takes.
"""

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
KIQA_SCORE = "import sys; from kiqa.cli import main; sys.exit(main())"


def make_images(folder, count, shared_data):
    """`count` 1024x768 JPEGs; returns what they were made from."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((shared_data / "realset" / "images").glob("koniq_*_1024.jpg")) if shared_data else []
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sources]
    photos = [p for p in photos if p.shape[:2] == (768, 1024)]
    rng = np.random.default_rng(0)
    for index in range(count):
        if photos:
            pixels = np.roll(photos[index % len(photos)], shift=(index * 7) % 64, axis=1)
        else:
            y, x = np.mgrid[0:768, 0:1024]
            base = np.stack([x // 4, y // 3, (x + y) // 7], axis=-1) % 256
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=80 + index % 16)
    return f"{len(photos)} real KonIQ 1024x768 photos, shifted and re-encoded" if photos else "generated"


def make_tiny_model(run_dir, image_size=(384, 512)):
    """A run folder with a tiny-backbone kiqa model at `image_size`."""
    import keras

    from kiqa.config import TrainConfig
    from kiqa.model import build_model

    config = TrainConfig.demo(weights="none", image_size=image_size)
    image = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(keras.layers.Rescaling(1 / 255.0)(image))
    model = build_model(config, backbone=keras.Model(image, features))
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    config.save(run_dir / "config.json")
    return run_dir


def timed(command, log):
    """Runs a command; (wall seconds, CPU seconds of it and its children, exit code)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def read_rows(paths):
    rows = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            next(reader)
            for name, mos, error in reader:
                rows[name] = float(mos) if mos else None
    return rows


def cases(python, model, images, out):
    """name -> (command, CSV files it writes)."""
    result = {"kiqa score": ([python, "-c", KIQA_SCORE, "score", str(images), "--model", str(model),
                              "--out", str(out / "score.csv"), "--quiet", "--no-skip"],
                             lambda: [out / "score.csv"])}
    for workers in (1, 2):
        prefix = out / f"beam{workers}" / "part"
        result[f"Beam DirectRunner, {workers} worker process{'es' if workers > 1 else ''}"] = (
            [python, "-m", "kiqa.beam", "--input", str(images), "--model", str(model),
             "--output", str(prefix), "--overwrite", "--formats", "csv",
             "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"],
            lambda prefix=prefix: sorted(prefix.parent.glob("part-*-of-*.csv")))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images in the large job (default 500)")
    parser.add_argument("--few", type=int, default=20, help="images in the start-up job (default 20)")
    parser.add_argument("--model", help="any model kiqa score takes (default: a tiny model at 384x512)")
    parser.add_argument("--shared-data", default=os.environ.get("KIQA_SHARED_DATA", ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kiqa-beam-bench-"))
    shared = Path(args.shared_data) if Path(args.shared_data).is_dir() else None
    made_from = make_images(work / "many", args.images, shared)
    (work / "few").mkdir()
    for path in sorted((work / "many").iterdir())[: args.few]:
        os.link(path, work / "few" / path.name)
    model = Path(args.model) if args.model else make_tiny_model(work / "run")

    import apache_beam
    import tensorflow as tf

    load_start = os.getloadavg()
    results = {}
    for size, images in ((args.few, work / "few"), (args.images, work / "many")):
        for name, (command, outputs) in cases(sys.executable, model, images, work / f"out{size}").items():
            wall, cpu, code = timed(command, work / f"{name.replace(' ', '_')}-{size}.log")
            if code not in (0, 3):
                raise SystemExit(f"{name} failed (exit {code}); see {work}")
            results.setdefault(name, {})[size] = {"wall_s": wall, "cpu_s": cpu, "rows": read_rows(outputs())}

    reference = results["kiqa score"][args.images]["rows"]
    table = []
    for name, runs in results.items():
        few, many = runs[args.few], runs[args.images]
        rows = many.pop("rows")
        few.pop("rows")
        same = set(rows) == set(reference) and all(
            abs(rows[k] - reference[k]) <= 1e-4 for k in rows if rows[k] is not None)
        extra = args.images - args.few
        # The per-image rate from the difference of the two jobs; None when the machine's
        # noise is larger than the difference (other jobs sharing the cores).
        wall_delta, cpu_delta = many["wall_s"] - few["wall_s"], many["cpu_s"] - few["cpu_s"]
        per_s = extra / wall_delta if wall_delta > 2.0 else None
        per_cpu_s = extra / cpu_delta if cpu_delta > 1.0 else None
        table.append({
            "case": name, "jobs": runs,
            "images_per_s": args.images / many["wall_s"],
            "images_per_cpu_s": args.images / many["cpu_s"],
            "startup_s": few["wall_s"] - args.few / per_s if per_s else None,
            "startup_cpu_s": few["cpu_s"] - args.few / per_cpu_s if per_cpu_s else None,
            "marginal_images_per_s": per_s,
            "marginal_images_per_cpu_s": per_cpu_s,
            "rows_equal_kiqa_score": same,
        })
    base = table[0]
    for row in table:
        row["ratio_images_per_s"] = row["images_per_s"] / base["images_per_s"]
        row["ratio_images_per_cpu_s"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]

    print(f"{args.images} images ({made_from}); model: {args.model or 'tiny model at 384x512'}")
    def cell(value, width):
        return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"

    print(f"{'case':<40} {'img/s':>6} {'img/CPU-s':>9} {'vs score':>8} {'per CPU':>7} "
          f"{'start-up s':>10} {'start-up CPU-s':>14} {'marg. img/s':>11} {'marg. img/CPU-s':>15} same")
    for row in table:
        print(f"{row['case']:<40} {row['images_per_s']:6.1f} {row['images_per_cpu_s']:9.1f} "
              f"{row['ratio_images_per_s']:7.2f}x {row['ratio_images_per_cpu_s']:6.2f}x "
              f"{cell(row['startup_s'], 10)} {cell(row['startup_cpu_s'], 14)} "
              f"{cell(row['marginal_images_per_s'], 11)} {cell(row['marginal_images_per_cpu_s'], 15)} "
              f"{row['rows_equal_kiqa_score']}")
    record = {
        "benchmark": "beam_score", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_at_start": load_start, "load_average_end": os.getloadavg()},
        "versions": {"apache_beam": apache_beam.__version__, "tensorflow": tf.__version__},
        "images": args.images, "few": args.few, "made_from": made_from,
        "model": args.model or "tiny model at 384x512 (benchmarks/beam_score.py make_tiny_model)",
        "results": table,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"beam-score-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {target}")
    shutil.rmtree(work, ignore_errors=True)  # kept only when a job failed (its logs are there)
    return 0


if __name__ == "__main__":
    sys.exit(main())
