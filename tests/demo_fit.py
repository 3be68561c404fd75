"""One deterministic training of kiqa's small CNN on demo photos it partly never sees: the
shared recipe of the two demo-data proofs, quality maps (tests/half_damage.py, issue #23) and
rating distributions (tests/spread_proof.py, issue #22).

`fit_demo_cnn` is a plain `model.fit` of kiqa's model (`build_model` with the small CNN and
the head's losses from `kiqa.train.losses`, Adam) on the decoded demo images, each epoch a
fresh mirror and, with `permute`, a fresh order of the colour channels, with the learning
rate decayed to zero over the run. `kiqa.train.train` would add a validation pass, early
stopping on one photo's crops, checkpoints and plots: several times the cost of the training
here, and a best epoch picked on 64 images.

Call it in a fresh process (`run_script`): it switches on
`tf.config.experimental.enable_op_determinism()`, a process-wide switch that must not reach
the other tests of a pytest worker, and the one thing that makes a CPU training run repeat
bit for bit (before it, one seed gave held-out SD SRCC 0.63 in one run and 0.21 in the next).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# The demo photos (kiqa.data.synthetic.PHOTOS) in the pairs the proofs hold out in turn: name
# order, with the two motorcycle photos (a stereo pair, nearly one scene) kept together.
FOLDS = (("astronaut", "camera"), ("chelsea", "coffee"), ("coins", "rocket"),
         ("motorcycle_left", "motorcycle_right"))
# Six training photos are few: a random order of the colour channels per image and epoch
# (`permute`) keeps the model from reading a photo's colours as its quality. Without it the
# maps found blur 8 times in 10 for four of six seeds (docs/maps.md) and the spread proof's
# held-out SD SRCC fell from 0.35 to 0.14 on one fold (docs/uncertainty.md).
CHANNEL_ORDERS = np.array([(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2), (2, 1, 0)])
# A training subprocess that takes longer than this is stuck, not slow (idle: 1-2 min).
TRAIN_TIMEOUT_S = 900


def demo_labels(root, recipe):
    """The label file of the recipe's demo data under `root`/demo (written once); its images
    are in the `images` folder beside it."""
    from kiqa.data import synthetic

    labels = Path(root) / "demo" / "labels.csv"
    if not labels.is_file():
        synthetic.write_demo_dataset(labels.parent, crops_per_photo=recipe["crops_per_photo"],
                                     size=tuple(recipe["size"]))
    return labels


def demo_frame(root, recipe):
    """(label frame, float32 pixels [n, h, w, 3]) of the recipe's demo data (`demo_labels`)."""
    import pandas as pd
    from PIL import Image

    labels = demo_labels(root, recipe)
    frame = pd.read_csv(labels)
    pixels = np.stack([np.asarray(Image.open(labels.parent / "images" / name).convert("RGB"), np.float32)
                       for name in frame.image_name])
    return frame, pixels


def fit_demo_cnn(root, seed, held_out, recipe, run_dir, head="regression", sd_loss_weight=None):
    """Trains the small CNN on the demo photos not in `held_out` (module docstring) and saves
    it as a run folder that `kiqa.scoring.scorer.load_scorer` reads.

    Args:
        root: folder of the demo data (`demo/`, kept if there).
        seed: seeds the weights, the order and the augmentation.
        held_out: names of demo photos (`kiqa.data.synthetic.PHOTOS` without the extension)
            none of whose crops are trained on.
        recipe: dict of widths, crops_per_photo, size, epochs, batch_size, learning_rate,
            permute (bool) and crop ((height, width) or None).
        run_dir: folder for the trained model (model.keras) and its config.json.
        head: "regression" or "distribution" (`TrainConfig.head`).
        sd_loss_weight: the distribution head's spread term (`TrainConfig.sd_loss_weight`;
            None: its default, what `kiqa-train` users get).

    Returns:
        (model, config, label frame, pixels, boolean mask of the held-out rows).
    """
    import keras
    import tensorflow as tf

    from kiqa.config import TrainConfig
    from kiqa.data import koniq
    from kiqa.model import build_model, small_cnn
    from kiqa.train import losses

    frame, pixels = demo_frame(root, recipe)
    test = frame.source_image.isin(held_out).to_numpy()
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)  # before the backbone: its weights are made when it is built
    spread = {} if sd_loss_weight is None else dict(sd_loss_weight=sd_loss_weight)
    config = TrainConfig.demo(weights="none", image_size=tuple(recipe["size"]), seed=seed, head=head,
                              learning_rate=recipe["learning_rate"], epochs=recipe["epochs"],
                              batch_size=recipe["batch_size"], **spread)
    model = build_model(config, backbone=small_cnn(tuple(recipe["widths"])))
    steps = recipe["epochs"] * -(-int((~test).sum()) // recipe["batch_size"])
    loss, loss_weights = losses(config)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(recipe["learning_rate"], steps)),
                  loss=loss, loss_weights=loss_weights)
    targets = {"mos": frame.MOS_zscore.to_numpy(np.float32)[~test]}
    if head == "distribution":
        targets["dist"] = koniq.require_shares(frame[~test])
    rng = np.random.default_rng(seed)
    for epoch in range(recipe["epochs"]):
        model.fit(augmented(pixels[~test], rng, recipe), targets, batch_size=recipe["batch_size"],
                  initial_epoch=epoch, epochs=epoch + 1, shuffle=True, verbose=0)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / "model.keras")
    config.save(run_dir / "config.json")
    return model, config, frame, pixels, test


def augmented(images, rng, recipe):
    """A fresh quality-preserving variant of every image: mirrored or not, and optionally
    its colour channels permuted (`recipe["permute"]`) and a random `recipe["crop"]`
    (height, width) cut out."""
    out = np.where(rng.random(len(images))[:, None, None, None] < 0.5, images, images[:, :, ::-1])
    if recipe.get("permute"):
        out = np.take_along_axis(out, CHANNEL_ORDERS[rng.integers(0, 6, len(out))][:, None, None, :], axis=3)
    if recipe.get("crop"):
        height, width = recipe["crop"]
        tops = rng.integers(0, out.shape[1] - height + 1, len(out))
        lefts = rng.integers(0, out.shape[2] - width + 1, len(out))
        out = np.stack([image[t:t + height, left:left + width] for image, t, left in zip(out, tops, lefts)])
    return out


def run_script(script, args):
    """Runs `python script *args` in a fresh process; returns its last stdout line as JSON."""
    command = [sys.executable, str(script), *map(str, args)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, env=os.environ.copy())
    if process.returncode:
        raise RuntimeError(f"training failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])
