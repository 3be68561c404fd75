"""Runs in a subprocess for tests/test_jax.py: Keras' backend is fixed when Keras loads,
so JAX-backend code cannot share the (TensorFlow-backend) test process.

Usage: python jax_worker.py predict MODEL.keras PIXELS.npy OUT.npy
  Loads a kiqa model under the JAX backend and writes its "mos" predictions for the
  float32 pixels [n, h, w, 3] (0-255) in PIXELS.npy to OUT.npy.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"


def predict(model_path, pixels_path, out_path):
    import numpy as np

    from kiqa.model import load_model

    model = load_model(model_path)
    pixels = np.load(pixels_path)
    np.save(out_path, np.asarray(model.predict_on_batch(pixels)["mos"], np.float64))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"predict": predict}[mode](*args)
