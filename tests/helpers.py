"""Small builders shared by tests (not product options)."""

import shutil

import keras
import numpy as np
import pandas as pd

from kiqa import export
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


def make_tiny_run(run_dir, seed=0, head_scale=1.0):
    """A run directory (model.keras + config.json) holding a tiny-backbone kiqa model.

    Args:
        run_dir: folder to create.
        seed: weight initialisation seed.
        head_scale: multiplies the head's kernel; a random head moves scores by ~0.01 MOS
            between images, so tests that compare scores scale it until they differ by points.

    Returns:
        The model.
    """
    config = TrainConfig.demo(weights="none", image_size=EXPORT_SIZE)
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


def shared_export(tmp_path_factory):
    """(run dir, base path) of one export per session, built by whichever module asks first."""
    root = tmp_path_factory.getbasetemp() / "kiqa-shared-export"
    run_dir, base = root / "run", root / "kiqa"
    if not (base / "1" / "saved_model.pb").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_tiny_run(run_dir)
        export.export_model(run_dir, base_path=base)
    return run_dir, base


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
