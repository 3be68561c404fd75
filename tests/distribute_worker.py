"""Runs in a subprocess for tests/test_distribute.py: TF's device and cluster set-up must
happen before TensorFlow starts, so it cannot share the test process.

Usage: python distribute_worker.py MODE LABELS RUN_DIR
  MODE "compare": one epoch on one device and on two logical CPUs (MirroredStrategy);
                  prints JSON {"one": loss, "mirrored": loss}.
  MODE "worker":  one short multi-worker run through kiqa.train.train (TF_CONFIG set by
                  the caller); prints JSON {"run_dir": ..., "epochs": n}.
"""

import json
import sys

import tensorflow as tf


def plain_cnn():
    """A backbone without BatchNormalization: its loss does not depend on the per-replica batch."""
    import keras

    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(image)
    for width in (8, 16):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(image, x, name="plain_cnn")


def config(labels, run_dir, **changes):
    from kiqa.config import TrainConfig

    fields = dict(labels=labels, run_dir=run_dir, weights="none", image_size=(32, 32),
                  batch_size=8, epochs=1, hflip=False, cache="none")
    return TrainConfig.demo(**dict(fields, **changes))


def compare(labels, run_dir):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import pandas as pd

    from kiqa.data.koniq import make_splits
    from kiqa.data.validate import load_checked_labels
    from kiqa.distribute import make_strategy
    from kiqa.train import train_split

    losses = {}
    for name in ("one-device", "mirrored"):
        cfg = config(labels, f"{run_dir}/{name}", strategy=name)
        frame, _ = load_checked_labels(cfg, progress=False)
        split = make_splits(frame, cfg)[0]
        strategy = make_strategy(name)
        train_split(split, cfg, cfg.resolved_run_dir, backbone=plain_cnn, verbose=0, strategy=strategy)
        losses[name] = float(pd.read_csv(f"{cfg.resolved_run_dir}/history.csv")["loss"].iloc[0])
        losses[name + "_replicas"] = strategy.num_replicas_in_sync
    print(json.dumps(losses))


def worker(labels, run_dir):
    from kiqa.train import train

    result = train(config(labels, run_dir, strategy="multi-worker", epochs=2), backbone=plain_cnn, progress=False)
    print(json.dumps({"run_dir": str(result.run_dir), "srcc": result.metrics.get("srcc")}))


if __name__ == "__main__":
    mode, labels, run_dir = sys.argv[1:4]
    {"compare": compare, "worker": worker}[mode](labels, run_dir)
