"""Small builders shared by tests (not product options)."""

import keras
import pandas as pd

from kiqa.data import synthetic


def small_cnn(widths=(16, 32, 48, 64)):
    """A plain ReLU CNN stand-in for ConvNeXt: fast on CPU, learns the demo distortions."""
    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    for width in widths:
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(image, x, name="small_cnn")


def demo_subset(folder, per_source=4, crops_per_photo=1, seed=0):
    """Writes the demo data and a label CSV with a few images per source photo.

    Returns:
        Path of the subset CSV (images resolve through its `images/` folder).
    """
    labels = synthetic.write_demo_dataset(folder / "demo", crops_per_photo=crops_per_photo, seed=seed)
    frame = pd.read_csv(labels)
    subset = frame.groupby("source_image", group_keys=False).apply(
        lambda g: g.sample(min(per_source, len(g)), random_state=seed)
    )
    path = labels.parent / f"subset{per_source}.csv"
    subset.to_csv(path, index=False)
    return path
