"""TF Serving's warmup records, and the generated images they (and parity checks) use.

`assets.extra/tf_serving_warmup_requests` holds PredictionLog records, one per bytes
signature and batch size TF Serving's batching pads to, so the first real request of
each size is not the slow one.
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

from kiqa.contract import BYTES_INPUT, BYTES_SIGNATURE, LENIENT_SIGNATURE
from kiqa.errors import ExportError

# One warmup record per batch size that serving/batching_parameters.txt pads to
# (allowed_batch_sizes): on a GPU each new shape pays cuDNN autotuning once.
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def generated_images(count=6, seed=0):
    """Small synthetic photos-like images, encoded, for parity checks and warmup.

    Smooth gradients, shapes and noise at varied sizes and aspect ratios, half JPEG and
    half PNG, so decode, resize and the model all see varied input.

    Args:
        count: number of images.
        seed: seeds the content.

    Returns:
        list of (name, bytes).
    """
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (96, 72), (120, 160), (64, 200), (150, 100), (80, 80)]  # pixels, not the MOS scale
    images = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-2, 2, size=(2, 3))
        pixels = base + y[..., None] * slope[0] + x[..., None] * slope[1]
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 40)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        pixels[disc] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, rng.uniform(0, 25), size=pixels.shape)
        pixels = tf.constant(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 2 == 0:
            images.append((f"generated-{i}.jpg", tf.io.encode_jpeg(pixels, quality=int(rng.integers(20, 95))).numpy()))
        else:
            images.append((f"generated-{i}.png", tf.io.encode_png(pixels).numpy()))
    return images


def warmup_requests(model_name, batch_sizes=WARMUP_BATCH_SIZES):
    """PredictionLog records for TF Serving's warmup file, one per bytes signature and batch size.

    Args:
        model_name: the model name in the requests' ModelSpec.
        batch_sizes: number of images in each record.

    Returns:
        list of `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    images = [contents for _, contents in generated_images(max(batch_sizes), seed=1)]
    logs = []
    # TF Serving batches each signature in its own queue, so each warms up on its own.
    for signature in (BYTES_SIGNATURE, LENIENT_SIGNATURE):
        for size in batch_sizes:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(images[:size], dtype=tf.string, shape=[size]))
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup_file(path, logs):
    """Writes PredictionLog records as the TFRecord file TF Serving replays at load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def read_warmup_file(path):
    """Reads the PredictionLog records of a warmup file.

    Raises:
        ExportError: the file is missing or holds something else than PredictionLogs.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"warmup file {path} not found")
    try:
        return [
            prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))
        ]
    except (tf.errors.OpError, ValueError) as err:
        raise ExportError(f"warmup file {path} is not a TFRecord file of PredictionLogs: {err}") from err
