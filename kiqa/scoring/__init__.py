"""Scoring images with a local model, one concern per module, imports one way.

- `kiqa.scoring.files`: finding the image files under files and folders (link checks,
  unsupported formats).
- `kiqa.scoring.batches`: the one read-decode-batch-score loop, for any model object with
  an image size, a pixel cap and a pixels-to-scores call.
- `kiqa.scoring.scorer`: `Scorer` and `load_scorer` (Keras, SavedModel, ONNX); never the CSV job.
- `kiqa.scoring.table`: the resumable scores CSV job, its rows and summary.
- `kiqa.scoring.compare`: comparing folders of images scored by one model.

Imports go one way: files and batches import neither scorer nor table; scorer imports
batches and files; table imports files and batches; compare imports table.
"""
