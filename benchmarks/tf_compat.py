"""Which TensorFlow versions (and so which TF Serving images) run kiqa's SavedModel the same.

    python benchmarks/tf_compat.py                          # TF 2.19.1 and 2.20.0 (~15-25 min)
    python benchmarks/tf_compat.py --versions 2.20.0 --work /tmp/tfcompat

TF Serving's images lag TensorFlow (serving issue 4129; its newest tag in mid-2026 was
2.20.0), and a SavedModel written by a newer TF may use ops or attributes an older
runtime does not know. This script answers the question the only honest way: it runs
the model in those runtimes.

1. With this interpreter's TF (2.21), it exports two models with `kiqa.serving.export.export_model`:
   a tiny CNN backbone at 32x48 and ConvNeXt-Tiny (random weights, fast depthwise
   path) at 384x512, and scores the real photos (`../shared/data/realset`, else
   generated JPEGs/PNGs) through both signatures of the reloaded SavedModel.
2. For each version it creates a throw-away venv under `--work` (`pip install
   tensorflow==V`; reused when it already has that TF), and runs a child script there
   that loads each SavedModel (`tf.saved_model.load`, what TF Serving's loader does
   under the hood) and runs `serving_default` on the encoded bytes and `score_pixels`
   on the very pixels 2.21 decoded.
3. It prints a table (load ok, max |ΔMOS| per signature against 2.21) and writes JSON.

The child imports only TensorFlow and numpy, never kiqa: a TF Serving binary has no
kiqa either. A load failure (e.g. "Op type not registered") is recorded with its text.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEFAULT_VERSIONS = ("2.19.1", "2.20.0")
# Same bound as the export's own parity check: a different runtime may pick other
# kernels (sum order), which moves scores by ~1e-4 MOS; a changed op moves whole points.
TOLERANCE = 0.05

CHILD = r'''
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf

job = json.load(open(sys.argv[1]))
out = {"tf_version": tf.__version__, "models": {}}
for name, model in job["models"].items():
    entry = {}
    start = time.perf_counter()
    try:
        loaded = tf.saved_model.load(model["path"])
        entry["load_seconds"] = round(time.perf_counter() - start, 2)
        contents = [open(p, "rb").read() for p in job["images"]]
        pixels = np.load(model["pixels"])
        by_bytes, by_pixels = [], []
        for i in range(0, len(contents), 4):
            b = loaded.signatures["serving_default"](image_bytes=tf.constant(contents[i:i + 4]))
            by_bytes.extend(b["mos"].numpy().tolist())
            p = loaded.signatures["score_pixels"](image=tf.constant(pixels[i:i + 4]))
            by_pixels.extend(p["mos"].numpy().tolist())
        entry.update(ok=True, bytes=by_bytes, pixels=by_pixels)
    except Exception as err:  # record any failure with its text: that is the result
        entry.update(ok=False, error=f"{type(err).__name__}: {' '.join(str(err).split())[:600]}")
    out["models"][name] = entry
json.dump(out, open(sys.argv[2], "w"))
'''


def build_exports(work, images):
    """Exports the two models with this TF and scores `images` through the reload."""
    import keras
    import tensorflow as tf

    from kiqa.serving import export, savedmodel
    from kiqa.config import TrainConfig
    from kiqa.image import decode_image, read_image_bytes
    from kiqa.model import build_model

    models = {}
    specs = {
        "tiny-cnn": ((32, 48), "tiny"),
        "convnext-tiny": ((384, 512), "convnext"),
    }
    for name, (size, kind) in specs.items():
        base = work / "exports" / name
        config = TrainConfig.demo(weights="none", image_size=size)
        keras.utils.set_random_seed(0)
        if kind == "tiny":
            image = keras.Input((None, None, 3))
            x = keras.layers.Rescaling(1 / 255.0)(image)
            x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
            model = build_model(config, backbone=keras.Model(image, x))
            # A random head moves scores by ~0.01 MOS between images; scale it so a
            # changed decode shows up as a difference of points.
            head = model.get_layer("head_dense")
            head.kernel.assign(head.kernel * 50.0)
        else:
            import dataclasses

            model = build_model(dataclasses.replace(config, variant="tiny"))
        version = savedmodel.list_versions(base)
        path = base / "1" if version else export.export_model(model, base_path=base, version=1, config=config, image_size=size)
        loaded = tf.saved_model.load(str(path))
        pixels = np.stack([decode_image(read_image_bytes(p), size).numpy() for p in images])
        np.save(work / f"{name}-pixels.npy", pixels)
        by_bytes, by_pixels = [], []
        for i in range(0, len(images), 4):
            contents = tf.constant([read_image_bytes(p) for p in images[i : i + 4]])
            by_bytes.extend(loaded.signatures["serving_default"](image_bytes=contents)["mos"].numpy().tolist())
            by_pixels.extend(loaded.signatures["score_pixels"](image=tf.constant(pixels[i : i + 4]))["mos"].numpy().tolist())
        models[name] = {
            "path": str(path), "pixels": str(work / f"{name}-pixels.npy"), "image_size": list(size),
            "bytes": by_bytes, "pixels_mos": by_pixels,
        }
    return models, tf.__version__


def ensure_venv(work, version, log):
    """A venv with tensorflow==version (reused when it already has it)."""
    venv = work / f"venv-tf{version}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import tensorflow as tf; print(tf.__version__)"]
    if python.is_file():
        done = subprocess.run(check, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == version:
            return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    with open(log, "a") as out:
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"tensorflow=={version}"],
                       check=True, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    return python


def run_version(python, work, job_file, version):
    result_file = work / f"result-{version}.json"
    child = work / "child.py"
    child.write_text(CHILD)
    done = subprocess.run([str(python), str(child), str(job_file), str(result_file)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"tf_version": version, "error": done.stderr[-1500:]}
    return json.loads(result_file.read_text())


def compare(reference, result):
    rows = []
    for name, ref in reference.items():
        got = result.get("models", {}).get(name)
        row = {"model": name, "image_size": ref["image_size"], "tf_version": result.get("tf_version")}
        if got is None:
            row.update(ok=False, error=result.get("error", "no result"))
        elif not got["ok"]:
            row.update(ok=False, error=got["error"])
        else:
            db = float(np.max(np.abs(np.subtract(got["bytes"], ref["bytes"]))))
            dp = float(np.max(np.abs(np.subtract(got["pixels"], ref["pixels_mos"]))))
            row.update(ok=max(db, dp) <= TOLERANCE, max_abs_diff_bytes=db, max_abs_diff_pixels=dp,
                       load_seconds=got.get("load_seconds"))
        rows.append(row)
    return rows


def parity_images(work):
    """The real photos if present, else a few generated JPEGs and PNGs."""
    shared = Path(os.environ.get("KIQA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "realset" / "images"
    if shared.is_dir():
        files = sorted(p for p in shared.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            return files, "real photos (shared/data/realset)"
    from kiqa.serving.warmup import generated_images

    folder = work / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (_, contents) in enumerate(generated_images()):
        path = folder / f"g{i}.img"
        path.write_bytes(contents)
        files.append(path)
    return files, "generated images"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiqa-tfcompat"),
                        help="throw-away venvs and exports go here (reused by a rerun)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images, image_source = parity_images(args.work)
    reference, tf_version = build_exports(args.work, images)
    job = {"images": [str(p) for p in images],
           "models": {n: {"path": m["path"], "pixels": m["pixels"]} for n, m in reference.items()}}
    job_file = args.work / "job.json"
    job_file.write_text(json.dumps(job))
    rows = []
    for version in args.versions:
        print(f"TF {version}: preparing its venv ...", file=sys.stderr, flush=True)
        try:
            python = ensure_venv(args.work, version, args.work / "pip.log")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            rows.extend({"model": n, "tf_version": version, "ok": False, "error": f"pip install failed: {err}"}
                        for n in reference)
            continue
        rows.extend(compare(reference, run_version(python, args.work, job_file, version)))
    print(f"\nkiqa SavedModel exported with TF {tf_version}, run in other TF versions on "
          f"{len(images)} {image_source}; max |ΔMOS| against TF {tf_version}'s own scores "
          f"(tolerance {TOLERANCE})\n")
    print("| TF | model | loads and runs | max abs dMOS serving_default | max abs dMOS score_pixels |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "max_abs_diff_bytes" in row:
            print(f"| {row['tf_version']} | {row['model']} {row['image_size'][0]}x{row['image_size'][1]} | "
                  f"{'yes' if row['ok'] else 'NO (scores differ)'} | {row['max_abs_diff_bytes']:.2g} | "
                  f"{row['max_abs_diff_pixels']:.2g} |")
        else:
            print(f"| {row['tf_version']} | {row['model']} | NO: {row['error'][:200]} | - | - |")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out / f"tf_compat-{stamp}.json"
    out.write_text(json.dumps({"exported_with": tf_version, "images": job["images"], "image_source": image_source,
                               "tolerance": TOLERANCE, "rows": rows, "seconds": round(time.time() - started)},
                              indent=2) + "\n")
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
