"""Facts every layer shares: image defaults, SavedModel names, the score scale, client defaults.

Training, local scoring, the exporter, the gRPC client, the dev server and the CLI read
these from here, so each is defined once. This module imports nothing (no TensorFlow), so
the command-line help of `kiqa predict` and `kiqa fetch-koniq` can use it without waiting for TF.
"""

# The training and scoring default (height, width). KonIQ's photos are all 4:3 (1024x768),
# so 384x512 keeps their aspect exactly.
DEFAULT_IMAGE_SIZE = (384, 512)

# Images whose header announces more pixels than this are rejected before decoding.
# 64 MP covers every camera photo in common use; a 20000x20000 PNG of 1 MB would
# otherwise decode to 1.2 GB.
DEFAULT_MAX_PIXELS = 64_000_000

# Encoded files larger than this are refused before reading: a JPEG of a 64 MP photo
# is ~30 MB, and `tf.io.read_file` on a link to /dev/zero reads until memory runs out.
DEFAULT_MAX_BYTES = 200 * 1024 * 1024

# File name endings (lower case) that folder searches treat as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# Scores are KonIQ-10k's MOS: 0 (worst) to 100 (best); higher is better.
MOS_SCALE = 100.0

# The exported SavedModel's signatures and their tensor names. `serving_default` takes
# encoded files and decodes them in the graph; `score_pixels` takes pixels already
# decoded and resized (0..255 float32). The Keras model's input and output use the same
# `image` and `mos` names.
BYTES_SIGNATURE = "serving_default"
# Same input as serving_default, but a bad item never fails the request: its `mos` is
# NaN and its `error` says why (empty for a scored item). Exports made before it existed
# lack it; kiqa's client then falls back to serving_default and per-item retries.
LENIENT_SIGNATURE = "score_bytes_lenient"
PIXELS_SIGNATURE = "score_pixels"
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "image"
MOS_OUTPUT = "mos"
ERROR_OUTPUT = "error"
# The model's provenance record, readable remotely. TF Serving's GetModelMetadata answers
# only "signature_def", so the record is served by a signature of its own. It takes a
# string[-1] input it ignores and returns one copy of the JSON per item: TF Serving's REST
# API refuses a signature without inputs (serving issue 1676), and its batching session
# needs a batch dimension on every input and output. An export without a record returns "".
PROVENANCE_SIGNATURE = "provenance"
PROVENANCE_INPUT = "request"
PROVENANCE_OUTPUT = "provenance"
# Quality maps (`kiqa.maps`): same `image_bytes` input and decoding as serving_default,
# returns `mos` float[-1] and `quality_map` float[-1, rows, cols] (local MOS, 0-100; its
# mean is `mos`). Exports made before it existed, or of a model whose head is not affine
# after the pooling, lack it.
QUALITY_MAP_SIGNATURE = "quality_map"
QUALITY_MAP_OUTPUT = "quality_map"
# Most images one request may hold, in every signature, checked in the graph (a larger
# request fails with INVALID_ARGUMENT on TF Serving too, before anything is decoded).
# 32 images at 384x512 are 75 MB of float32 pixels in one score_pixels request and a
# few GB of ConvNeXt-Tiny activations on the GPU; serving/batching_parameters.txt's
# max_batch_size must equal it (a test compares them).
MAX_BATCH = 32
# Largest gRPC message kiqa's client sends and `kiqa serve-dev` accepts by default:
# 128 MiB holds a full score_pixels batch at the default size (32 x 384x512x3 float32 =
# 75.5 MB) and a full bytes batch of 32 camera JPEGs of 4 MB. A larger file needs a
# higher limit on both sides. (TF Serving itself allows 2 GiB; its memory per request
# is then bounded only by MAX_BATCH and the pixel cap.)
MAX_REQUEST_BYTES = 128 * 2**20

# Files inside an export version directory, beside saved_model.pb. TF Serving replays the
# warmup file at load; kiqa.json records the image size, pixel cap and versions.
ASSETS_EXTRA = "assets.extra"
METADATA_FILE = "kiqa.json"
# Its key holding `kiqa.provenance.weights_fingerprint` of the exported weights.
WEIGHTS_KEY = "weights_sha256"
WARMUP_FILE = "tf_serving_warmup_requests"
# A model's provenance record (kiqa.provenance): in a run folder, in an export's
# ASSETS_EXTRA, and beside a scores CSV as "<csv name>.provenance.json".
PROVENANCE_FILE = "provenance.json"
# Images per forward pass when an export (SavedModel, ONNX, LiteRT) is checked against
# the Keras model: small enough for a 12 MP parity photo set to fit in memory.
PARITY_BATCH = 8

# TF Serving gRPC client defaults (`kiqa predict`, `kiqa.serving.client.ServingClient`).
DEFAULT_SERVER = "localhost:8500"  # TF Serving's gRPC port; 8501 is REST
DEFAULT_MODEL_NAME = "kiqa"
CLIENT_TIMEOUT = 30.0  # seconds per request
CLIENT_BATCH_SIZE = 16  # images per request; keep it at or below the server's max_batch_size
# gRPC's default is 4 MB, less than one 12 MP JPEG and its neighbours in a batch.
CLIENT_MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES

# A distribution model (`kiqa-train --head distribution`) adds two outputs beside `mos`:
# `mos_sd`, the predicted spread of people's ratings in 0-100 points, and `dist`, the
# predicted share of raters choosing each of KonIQ's five rating levels (1 = bad ...
# 5 = excellent; [batch, 5], each row sums to 1). A regression model has only `mos`.
# CSVs, Beam rows and client results spell the shares `p1` .. `p5` (KonIQ's label files
# call the true shares `c1` .. `c5`).
RATING_LEVELS = 5
SD_OUTPUT = "mos_sd"
DIST_OUTPUT = "dist"
SHARE_COLUMNS = tuple(f"p{k}" for k in range(1, RATING_LEVELS + 1))
DISTRIBUTION_COLUMNS = (SD_OUTPUT,) + SHARE_COLUMNS
# KonIQ's line from the raw 1-5 mean rating to the 0-100 MOS: a least-squares fit of `MOS`
# on the mean of c1..c5 over all 10,073 images of koniq10k_distributions_sets.csv, slope
# 27.8174, intercept -29.2287, r 0.99536, residual SD 1.485, largest residual 5.50 points
# (tests/test_distribution.py recomputes them from the file). `kiqa.distribution` states
# how mos and mos_sd follow from it.
KONIQ_MOS_SLOPE = 27.8174
KONIQ_MOS_INTERCEPT = -29.2287
# The training heads (`TrainConfig.head`): one score, or the rating distribution.
HEADS = ("regression", "distribution")

# A scores row (`kiqa score`'s CSV, `Scorer.score_many`'s table, Beam's rows and
# `kiqa predict`'s CSV): the file, its MOS (empty when it failed) and why it failed (empty
# when it was scored). A distribution model's row holds `DISTRIBUTION_COLUMNS` between
# `mos` and `error`.
PATH_COLUMN = "path"
MOS_COLUMN = "mos"
ERROR_COLUMN = "error"
CSV_COLUMNS = (PATH_COLUMN, MOS_COLUMN, ERROR_COLUMN)
DISTRIBUTION_CSV_COLUMNS = (PATH_COLUMN, MOS_COLUMN) + DISTRIBUTION_COLUMNS + (ERROR_COLUMN,)
