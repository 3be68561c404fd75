"""Does the quality map find damage? The half-damage proof of issue #23 over several seeds.

For each seed: train the proof's small CNN on whole demo images (tests/half_damage.py, in a
fresh deterministic process), then damage the left or right half of 10 new crops of the
photos it never saw (blur, noise, JPEG at the demo's level 5) and count the crops whose
damaged half has the lower mean map value. Also per kind: the mean margin (undamaged minus
damaged half, MOS points), the same count for scoring each half as its own crop, and for
gradient attribution (mean |d score / d pixel| per half: is the damaged half the one the
score is more sensitive to?). Prints a table; writes JSON and CSV.

    python benchmarks/half_damage.py --seeds 1 2 3 4 5 [--folds 0 1 2 3] [--recipe '{"epochs": 12}'] [--out DIR]
"""

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402

import half_damage as hd  # noqa: E402  (tests/half_damage.py: the recipe and the check)


def crop_pairs(scorer, images, sides):
    """{kind: [(damaged, undamaged)]}: each half scored as its own image, at its own size.

    The model is fully convolutional up to its global pooling, so a half goes in as it is:
    stretching it to the full width would halve the frequencies that noise and blur change.
    """
    from kiqa.image import decode_image

    model = scorer._owner
    width = scorer.image_size[1]
    found = {}
    for kind, blobs in images.items():
        found[kind] = []
        for blob, side in zip(blobs, sides):
            pixels = decode_image(blob, scorer.image_size, scorer.max_pixels)[None]
            left, right = (float(model(half, training=False)["mos"][0])
                           for half in (pixels[:, :, : width // 2], pixels[:, :, width - width // 2:]))
            found[kind].append((left, right) if side == 0 else (right, left))
    return found


def gradient_pairs(scorer, images, sides):
    """{kind: [(damaged, undamaged)]} of minus mean |d score / d pixel| per half (lower = more sensitive).

    The sign is flipped so that "damaged < undamaged" reads as for the map: the damaged
    half is the one the score is more sensitive to.
    """
    import tensorflow as tf

    from kiqa.image import decode_image

    model = scorer._owner
    width = scorer.image_size[1]
    found = {}
    for kind, blobs in images.items():
        found[kind] = []
        for blob, side in zip(blobs, sides):
            pixels = tf.convert_to_tensor(decode_image(blob, scorer.image_size, scorer.max_pixels)[None])
            with tf.GradientTape() as tape:
                tape.watch(pixels)
                score = model(pixels, training=False)["mos"]
            magnitude = tf.abs(tape.gradient(score, pixels))[0].numpy().mean(axis=(0, 2))
            left, right = -magnitude[: width // 2].mean(), -magnitude[width - width // 2:].mean()
            found[kind].append((float(left), float(right)) if side == 0 else (float(right), float(left)))
    return found


def run_seed(work, seed, held_out, recipe):
    """Trains one seed and runs the three checks; returns one result row per damage kind."""
    from kiqa.scoring.scorer import load_scorer

    root = Path(work) / f"{'-'.join(held_out)}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    demo = Path(work) / "demo"
    if demo.is_dir() and not (root / "demo").exists():
        (root / "demo").symlink_to(demo)  # the demo data depend on the recipe, not the seed
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run_dir, held_out = hd.train_in_subprocess(root, seed, held_out, recipe)
    train_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    train_cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    if not demo.exists():
        (root / "demo").rename(demo)
        (root / "demo").symlink_to(demo)
    scorer = load_scorer(run_dir)
    start = time.perf_counter()
    maps = hd.summary(hd.map_pairs(scorer, held_out))
    check_s = time.perf_counter() - start
    images, sides = hd.half_damaged_images(held_out, scorer.image_size)
    crops = hd.summary(crop_pairs(scorer, images, sides))
    gradients = hd.summary(gradient_pairs(scorer, images, sides))
    facts = json.loads((root / "held_out.json").read_text())
    return [dict(seed=seed, kind=kind, held_out=" ".join(held_out), map_found=maps[kind]["found"],
                 map_margin=maps[kind]["margin"], crop_found=crops[kind]["found"], crop_margin=crops[kind]["margin"],
                 gradient_found=gradients[kind]["found"], held_out_srcc=facts["held_out_srcc"], train_s=round(train_s, 1),
                 train_cpu_s=round(train_cpu_s, 1),
                 map_check_s=round(check_s, 1)) for kind in hd.DAMAGE]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--folds", type=int, nargs="+", default=[0],
                        help="indices of tests/half_damage.py FOLDS to hold out in turn (0: the test's)")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of tests/half_damage.py RECIPE")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and CSV")
    args = parser.parse_args(argv)
    import pandas as pd

    recipe = {**hd.RECIPE, **json.loads(args.recipe)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="half-damage-") as work:
        for fold in args.folds:
            for seed in args.seeds:
                rows += run_seed(work, seed, hd.FOLDS[fold], json.loads(args.recipe))
                print(pd.DataFrame(rows[-3:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"half-damage-{stamp}.csv", index=False)
    by_kind = table.groupby(["held_out", "kind"]).agg(map_min=("map_found", "min"), map_median=("map_found", "median"),
                                        margin_min=("map_margin", "min"), margin_median=("map_margin", "median"),
                                        crop_min=("crop_found", "min"), gradient_median=("gradient_found", "median"))
    (out / f"half-damage-{stamp}.json").write_text(json.dumps(
        {"recipe": recipe, "needed": hd.NEEDED, "of": hd.PHOTOS, "seeds": args.seeds, "folds": [hd.FOLDS[f] for f in args.folds], "rows": rows,
         "by_kind": by_kind.reset_index().to_dict(orient="records"),
         "load_average": os.getloadavg()}, indent=1, default=str))
    print()
    print(table.to_string(index=False))
    print()
    print(by_kind.to_string())
    passed = bool((table.map_found >= hd.NEEDED).all())
    print(f"\nevery seed >= {hd.NEEDED}/{hd.PHOTOS} for every kind: {passed}")
    print(f"wrote {out / f'half-damage-{stamp}.json'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
