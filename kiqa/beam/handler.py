"""A RunInference `ModelHandler` over kiqa's own model loader.

Beam's `TFModelHandlerTensor` loads with `tf.keras.models.load_model`, which cannot load
a Keras 3 SavedModel (apache/beam issue 30616), and it knows nothing of kiqa's run
folders or `.keras` files. `KiqaModelHandler` loads with `kiqa.scoring.scorer.load_scorer`,
exactly what `kiqa score` uses, so a batch scored here gets the scores `kiqa score` gives.

A model on a remote Beam file system (gs://, s3://, hdfs://) is copied to a local
temporary folder of the worker first: TF and Keras load from local paths.
"""

import os
import shutil
import tempfile

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from kiqa.contract import DISTRIBUTION_COLUMNS, MOS_COLUMN
from kiqa.errors import ModelError
from kiqa.scoring.batches import DEFAULT_BATCH_SIZE, distribution_extras

# The largest batch one model call takes. The single place to switch to the export's
# documented maximum batch size once the serving contract carries one; the SavedModel's
# batch dimension itself is unbounded (-1), so the cap is about memory per call.
SIGNATURE_BATCH_LIMIT = DEFAULT_BATCH_SIZE


def is_remote(path):
    """True for a path on a non-local Beam file system (it has a scheme such as gs://)."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_copy(path, into):
    """Copies a file or a folder tree from any Beam file system into local folder `into`.

    Args:
        path: a file or folder (gs://bucket/export/kiqa/3, /data/model.keras, ...).
        into: an existing local folder.

    Returns:
        The local path of the copy (a file or folder named like `path`'s last part).

    Raises:
        ModelError: nothing exists at `path`.
    """
    path = str(path).rstrip("/")
    name = path.rsplit("/", 1)[-1]
    exact = FileSystems.match([path])[0].metadata_list
    inside = FileSystems.match([path + "/**"])[0].metadata_list
    files, root = (exact, path.rsplit("/", 1)[0]) if exact and not inside else (inside, path)
    if not files:
        raise ModelError(f"model {path} not found (no file or folder there)")
    destination = os.path.join(into, name)
    for metadata in files:
        relative = metadata.path[len(root):].lstrip("/")
        target = os.path.join(into if root != path else destination, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # UNCOMPRESSED: Beam would otherwise gunzip a file whose name ends in .gz.
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as source, \
                open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 22)
    return destination


class KiqaModelHandler(ModelHandler):
    """Scores decoded pixel arrays (`kiqa.image.decode_image` output) with a kiqa model.

    Examples are float32 arrays [height, width, 3] at the model's image size; each
    prediction is a `PredictionResult` whose `inference` is the MOS (KonIQ's 0-100
    scale, higher is better) as a float, and `model_id` the loaded model's source. For a
    distribution model (`Scorer.distribution`) `inference` is a dict by the scores row's
    column names: `mos` and `DISTRIBUTION_COLUMNS` (`mos_sd`, `p1` .. `p5`).

    RunInference keeps one loaded model per worker process (Beam's `shared.Shared`
    handle, shared by the process's threads): a CPU model scores fastest with one copy
    per process. `large_model=True` instead loads one copy per machine and serves the
    other processes through Beam's multi-process proxy (for a GPU with room for one copy).
    """

    def __init__(self, model_ref, image_size=None, safe_mode=True, batch_size=None,
                 large_model=False, engine="tf"):
        """Describes the model; nothing is loaded until a worker calls `load_model`.

        Args:
            model_ref: what `kiqa.load_scorer` takes (run folder, .keras file,
                SavedModel base path or version folder), on any Beam file system.
            image_size: (height, width) or None for the model's own size.
            safe_mode: refuse `.keras` files with Lambda layers (arbitrary code).
            batch_size: images per model call (None: `SIGNATURE_BATCH_LIMIT`).
            large_model: one model copy per machine instead of one per process.
            engine: what runs the model (`kiqa.scoring.scorer.ENGINES`); "openvino-bf16" is
                gated against float32 on kiqa's generated images when each worker loads.

        Raises:
            ModelError: batch_size is below 1 or above `SIGNATURE_BATCH_LIMIT`.
        """
        size = batch_size or SIGNATURE_BATCH_LIMIT
        if not 1 <= size <= SIGNATURE_BATCH_LIMIT:
            raise ModelError(
                f"batch size {size} is outside 1..{SIGNATURE_BATCH_LIMIT}, the largest batch "
                f"one call of kiqa's model takes"
            )
        # min == max: batches are the size `kiqa score` uses; only a bundle's last is smaller.
        super().__init__(min_batch_size=size, max_batch_size=size, large_model=large_model)
        self._model_ref = str(model_ref)
        self._image_size = tuple(image_size) if image_size else None
        self._safe_mode = safe_mode
        self._engine = engine

    def load_model(self):
        """Loads the model with `kiqa.scoring.scorer.load_scorer` (copied locally first if remote).

        Returns:
            A `kiqa.scoring.scorer.Scorer`.
        """
        from kiqa.scoring.scorer import load_scorer  # TF loads in the worker, not at pickling

        ref = self._model_ref
        if is_remote(ref):
            ref = local_copy(ref, tempfile.mkdtemp(prefix="kiqa-model-"))
        return load_scorer(ref, image_size=self._image_size, safe_mode=self._safe_mode, engine=self._engine)

    def run_inference(self, batch, model, inference_args=None):
        """Scores one batch of decoded images.

        Args:
            batch: sequence of float32 arrays [height, width, 3].
            model: the `Scorer` from `load_model`.
            inference_args: unused (kiqa's models take none).

        Returns:
            One `PredictionResult` per example, `inference` the MOS (a distribution
            model's: a dict of `mos`, `mos_sd` and `p1` .. `p5`).
        """
        if not getattr(model, "distribution", False):
            scores = model.predict_pixels(np.stack(batch))
            return [
                PredictionResult(example, float(value), model_id=model.source)
                for example, value in zip(batch, scores)
            ]
        outputs = model.predict_outputs(np.stack(batch))
        return [
            PredictionResult(example, {MOS_COLUMN: float(outputs["mos"][i]),
                                       **dict(zip(DISTRIBUTION_COLUMNS, distribution_extras(outputs, i)))},
                             model_id=model.source)
            for i, example in enumerate(batch)
        ]

    def get_num_bytes(self, batch):
        """Pixel bytes of a batch (Beam's default pickles the whole batch to count them)."""
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self):
        """Beam metrics of this handler appear under `kiqa`."""
        return "kiqa"

    def validate_inference_args(self, inference_args):
        """kiqa's models take no extra inference arguments.

        Raises:
            ModelError: some were given.
        """
        if inference_args:
            raise ModelError(f"kiqa models take no inference arguments, got {sorted(inference_args)}")
