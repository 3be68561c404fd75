"""kiqa's speed on this machine, side by side with PyTorch and Pillow, in one run.

    python benchmarks/run.py            # the full run (7-9 min on a quiet 2-core CPU, ~18 under load)
    python benchmarks/run.py --quick    # fewer sizes and repeats (~2 min)

Prints a table and writes benchmarks/results/<date>-<time>[-quick].json with the machine
(CPU model, cores, RAM, load), the versions, the settings, every sample and the medians.
Everything is measured in this one run and the repeats are interleaved (repeat 1 of
every case, then repeat 2 ...), so a burst of load from someone else on a shared machine
hits all cases alike: compare the ratios of one run, not absolute numbers across runs.

What is measured (ConvNeXt-Tiny with random weights and kiqa's 1-output head, float32):
- inference images/s of the Keras model (`kiqa.model.build_model`, weights none) with
  keras.applications' grouped Conv2D ("stock") and with kiqa's DepthwiseConv2D path
  ("fast"), also under `mixed_bfloat16`; PyTorch eager fp32 and bf16 channels-last
  (timm convnext_tiny, or a plain-PyTorch copy of it when timm cannot import);
- training images/s (Adam, one `train_on_batch` / optimizer step per batch);
- the exported SavedModel (`kiqa.serving.export.export_model`): its float and bytes signatures,
  its size against the weights' bytes, and cold start (load + first answer, with and
  without replaying the warmup records) in fresh processes;
- the input pipeline: `kiqa.image.decode_image` in tf.data with 2 threads, KonIQ-sized
  1024x768 JPEGs to the training size, against Pillow (and Pillow-SIMD when
  --pillow-simd-python names an interpreter that has it) with draft mode on 2 threads,
  and TF's decode_jpeg alone at the same DCT scale (the floor of any in-graph decoder);
  Images/s per core divides by the process CPU time, which is steadier than wall time
  when other jobs share the cores.

PyTorch and Pillow run in child processes (benchmarks/torch_reference.py,
benchmarks/pillow_pipeline.py), so their thread pools never compete with TensorFlow's
inside one process; they sit idle while TensorFlow is timed.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

import kiqa  # noqa: E402
from kiqa.image import header as imageinfo  # noqa: E402
from kiqa.config import TrainConfig  # noqa: E402
from kiqa.contract import DEFAULT_MAX_PIXELS  # noqa: E402
from kiqa.image import decode_image  # noqa: E402
from kiqa.serving.preprocess import jpeg_draft_ratio  # noqa: E402
from machine import machine_info  # noqa: E402
from kiqa.model import build_model, mos_loss  # noqa: E402

RESULTS = HERE / "results"
THREADS = 2  # the pipeline's threads; PyTorch gets as many threads as TF has cores

# (height, width, batch[, steps per repeat]). The full run keeps to ~20 minutes on 2
# shared cores: the stock model needs ~13 s per 384x512 batch of 8, and its training
# (~30 s per step at 384x512) is measured at 224x224 only.
SETTINGS = {
    "full": dict(
        repeats=4,
        signature_repeats=8,
        infer=((224, 224, 16), (384, 512, 8)),
        stock_infer=((224, 224), (384, 512)),
        bf16_infer=((224, 224), (384, 512)),
        torch_bf16_infer=True,
        torch_single_thread=((224, 224),),
        train=((224, 224, 8, 2), (384, 512, 8, 1)),
        stock_train=((224, 224),),
        bf16_train=((224, 224), (384, 512)),
        export_size=(384, 512),
        signature_batch=8,
        pipeline=((384, 512), (224, 224)),
        pipeline_images=320,
        cold_runs=2,
    ),
    "quick": dict(
        repeats=2,
        signature_repeats=4,
        infer=((224, 224, 16),),
        stock_infer=((224, 224),),
        bf16_infer=(),
        torch_bf16_infer=False,
        torch_single_thread=(),
        train=((224, 224, 8, 1),),
        stock_train=(),
        bf16_train=(),
        export_size=(224, 224),
        signature_batch=8,
        pipeline=((384, 512),),
        pipeline_images=160,
        cold_runs=1,
    ),
}

# The issue's targets, as ratios measured in one run on this machine.
TARGETS = {
    "inference_vs_torch_fp32": 1.2,
    "training_vs_torch_fp32": 1.0,
    "pipeline_vs_pillow_simd_per_core": 1.0,
    "bytes_vs_float_signature_time": 1.1,
    "export_vs_weights_bytes": 1.05,
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Sample:
    images: int
    seconds: float
    cpu_seconds: Optional[float] = None


@dataclasses.dataclass
class Case:
    """One thing timed: `run()` returns a Sample; `warmup()` runs once before the repeats."""

    section: str
    name: str
    setting: str
    key: str
    run: Callable[[], Sample]
    warmup: Optional[Callable[[], object]] = None
    samples: List[Sample] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    note: Optional[str] = None

    def rates(self):
        return [s.images / s.seconds for s in self.samples]

    def cpu_rates(self):
        return [s.images / s.cpu_seconds for s in self.samples if s.cpu_seconds]

    def median(self):
        rates = self.rates()
        return float(np.median(rates)) if rates else None

    def cpu_median(self):
        rates = self.cpu_rates()
        return float(np.median(rates)) if rates else None

    def to_dict(self):
        rates = self.rates()
        return {
            "section": self.section,
            "name": self.name,
            "setting": self.setting,
            "key": self.key,
            "images_per_s_median": self.median(),
            "images_per_s_min": min(rates) if rates else None,
            "images_per_s_max": max(rates) if rates else None,
            "images_per_cpu_s_median": self.cpu_median(),
            "samples": [dataclasses.asdict(s) for s in self.samples],
            "error": self.error,
            "note": self.note,
        }


def measure(cases, repeats):
    """Warms every case up, then runs the repeats interleaved across cases."""
    for case in cases:
        if case.warmup is None:
            continue
        log(f"warm-up  {case.section}: {case.name} [{case.setting}]")
        try:
            case.warmup()
        except Exception as err:  # recorded in the results; the run goes on
            case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log(f"  failed: {case.error}")
    for repeat in range(repeats):
        for case in cases:
            if case.error:
                continue
            try:
                sample = case.run()
            except Exception as err:
                case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log(f"  failed: {case.error}")
                continue
            case.samples.append(sample)
            log(f"repeat {repeat + 1}/{repeats} {case.section}: {case.name} [{case.setting}] "
                f"{sample.images / sample.seconds:.2f} img/s")


def timed(function, images):
    """A `run` that calls `function()` once and counts `images`."""

    def run():
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        return Sample(images, time.perf_counter() - wall, time.process_time() - cpu)

    return run


# ----------------------------------------------------------------------------- workers


class Worker:
    """A child process answering one JSON line per JSON command (torch_reference.py,
    pillow_pipeline.py)."""

    def __init__(self, argv, name):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )

    def ask(self, **command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read()[-500:].strip()
            raise RuntimeError(f"{self.name} exited: {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.stderr.close()


def worker_run(worker, images, **command):
    def run():
        reply = worker.ask(**command)
        seconds = reply["seconds"]
        if isinstance(seconds, list):
            seconds = sum(seconds)
        return Sample(images, seconds, reply.get("cpu_seconds"))

    return run


# ----------------------------------------------------------------------------- machine


def versions():
    import PIL

    return {
        "python": sys.version.split()[0],
        "kiqa": kiqa.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: oneDNN on)"),
    }


# ----------------------------------------------------------------------------- images


def shared_data_dir():
    env = os.environ.get("KIQA_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def koniq_sized_jpegs(folder):
    """KonIQ's real 1024x768 JPEGs from the shared real set, else generated ones."""
    real = sorted((shared_data_dir() / "realset" / "images").glob("koniq_*_1024.jpg"))
    if real:
        return real, f"{len(real)} real KonIQ-10k 1024x768 JPEGs from {real[0].parent}"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        y, x = np.mgrid[0:768, 0:1024]
        base = np.stack([x / 4.0, y / 3.0, (x + y) / 7.0], -1) + rng.normal(0, 12, (768, 1024, 3))
        pixels = np.clip(base, 0, 255).astype(np.uint8)
        path = Path(folder) / f"generated-{i}.jpg"
        path.write_bytes(tf.io.encode_jpeg(pixels, quality=90).numpy())
        paths.append(path)
    return paths, "4 generated 1024x768 JPEGs (the shared real set was not found)"


# ----------------------------------------------------------------------------- sections


def size_text(height, width, batch=None):
    return f"{height}x{width}" + (f", batch {batch}" if batch else "")


def keras_inference_case(model, name, key, height, width, batch):
    predict = tf.function(lambda images: model(images, training=False)["mos"])
    images = tf.random.uniform([batch, height, width, 3], 0, 255, seed=1)
    call = lambda: predict(images).numpy()  # noqa: E731
    return Case("inference", name, size_text(height, width, batch), f"{key}@{height}x{width}",
                timed(call, batch), warmup=call)


def keras_training_case(model, name, key, height, width, batch, steps):
    images = tf.random.uniform([batch, height, width, 3], 0, 255, seed=2)
    targets = {"mos": tf.random.uniform([batch], 0, 100, seed=3)}

    def call():
        for _ in range(steps):
            model.train_on_batch(images, targets)

    return Case("training", name, size_text(height, width, batch), f"{key}@{height}x{width}",
                timed(call, batch * steps), warmup=lambda: model.train_on_batch(images, targets))


def build(fast, policy="float32"):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        return build_model(TrainConfig(weights="none", fast_depthwise=fast))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss={"mos": mos_loss}, jit_compile=False)
    return model


def model_sections(settings, torch_worker, notes):
    log("building models (random weights)")
    fast, stock = build(True), build(False)
    bf16 = build(True, "mixed_bfloat16") if (settings["bf16_infer"] or settings["bf16_train"]) else None
    if bf16 is not None:
        layers = [l for l in bf16.get_layer("backbone").layers if l.weights]
        notes.append(
            f"mixed_bfloat16 model: {sum(l.compute_dtype == 'bfloat16' for l in layers)} of {len(layers)} "
            f"backbone layers with weights compute in bfloat16 (the head stays float32)"
        )
    inference = []
    for height, width, batch in settings["infer"]:
        if (height, width) in settings["stock_infer"]:
            inference.append(keras_inference_case(stock, "kiqa Keras, stock grouped Conv2D", "keras_stock", height, width, batch))
        inference.append(keras_inference_case(fast, "kiqa Keras, fast depthwise (default)", "keras_fast", height, width, batch))
        if bf16 is not None and (height, width) in settings["bf16_infer"]:
            inference.append(keras_inference_case(bf16, "kiqa Keras, fast depthwise, mixed_bfloat16", "keras_bf16", height, width, batch))
        if torch_worker is not None:
            threads = torch_worker.ask(cmd="info")["threads"]
            variants = [("fp32", threads, "PyTorch eager fp32", "torch_fp32")]
            if settings["torch_bf16_infer"]:
                variants.append(("bf16", threads, "PyTorch eager bf16 channels-last", "torch_bf16"))
            if (height, width) in settings["torch_single_thread"]:
                variants.append(("fp32", 1, "PyTorch eager fp32, 1 thread", "torch_fp32_1thread"))
            for precision, count, name, key in variants:
                command = dict(cmd="infer", precision=precision, size=[height, width], batch=batch, iters=1, threads=count)
                inference.append(Case("inference", name, size_text(height, width, batch), f"{key}@{height}x{width}",
                                      worker_run(torch_worker, batch, **command), warmup=worker_run(torch_worker, batch, **command)))
    measure(inference, settings["repeats"])

    training = []
    compiled(fast)
    compiled(stock)
    if bf16 is not None:
        compiled(bf16)
    for height, width, batch, steps in settings["train"]:
        if (height, width) in settings["stock_train"]:
            training.append(keras_training_case(stock, "kiqa Keras, stock grouped Conv2D", "keras_stock", height, width, batch, 1))
        training.append(keras_training_case(fast, "kiqa Keras, fast depthwise (default)", "keras_fast", height, width, batch, steps))
        if bf16 is not None and (height, width) in settings["bf16_train"]:
            training.append(keras_training_case(bf16, "kiqa Keras, fast depthwise, mixed_bfloat16", "keras_bf16", height, width, batch, steps))
        if torch_worker is not None:
            precisions = [("fp32", "PyTorch eager fp32")]
            if (height, width) in settings["bf16_train"]:
                precisions.append(("bf16", "PyTorch eager bf16 autocast channels-last"))
            for precision, name in precisions:
                command = dict(cmd="train", precision=precision, size=[height, width], batch=batch, iters=steps)
                warm = dict(command, iters=1)
                training.append(Case("training", name, size_text(height, width, batch), f"torch_{precision}@{height}x{width}",
                                     worker_run(torch_worker, batch * steps, **command),
                                     warmup=worker_run(torch_worker, batch, **warm)))
    measure(training, settings["repeats"])
    return fast, inference + training


def directory_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_sections(model, settings, files, workdir, notes):
    """SavedModel signatures, export size and cold start. Returns (cases, export info, cold runs)."""
    from kiqa.serving.export import export_model

    height, width = settings["export_size"]
    batch = settings["signature_batch"]
    log(f"exporting the fast model at {height}x{width}")
    start = time.perf_counter()
    version_dir = export_model(model, base_path=Path(workdir) / "export" / "kiqa", image_size=(height, width))
    export_seconds = time.perf_counter() - start

    raw_bytes = int(sum(np.asarray(w.numpy()).nbytes for w in model.weights))
    weights_file = Path(workdir) / "model.weights.h5"
    model.save_weights(weights_file)
    info = {
        "image_size": [height, width],
        "export_seconds": export_seconds,
        "parameters": int(model.count_params()),
        "weights_raw_bytes": raw_bytes,
        "weights_h5_bytes": weights_file.stat().st_size,
        "variables_bytes": directory_bytes(version_dir / "variables"),
        "saved_model_pb_bytes": (version_dir / "saved_model.pb").stat().st_size,
        "version_dir_bytes": directory_bytes(version_dir),
    }
    info["export_vs_weights_bytes"] = info["version_dir_bytes"] / raw_bytes
    info["variables_vs_weights_bytes"] = info["variables_bytes"] / raw_bytes

    blobs = [Path(f).read_bytes() for f in files]
    contents = tf.constant([blobs[i % len(blobs)] for i in range(batch)])
    pixels = tf.stack([decode_image(blobs[i % len(blobs)], (height, width)) for i in range(batch)])
    loaded = tf.saved_model.load(str(version_dir))
    by_pixels, by_bytes = loaded.signatures["score_pixels"], loaded.signatures["serving_default"]
    keras_predict = tf.function(lambda images: model(images, training=False)["mos"])
    calls = {
        "keras": lambda: keras_predict(pixels).numpy(),
        "float": lambda: by_pixels(image=pixels)["mos"].numpy(),
        "bytes": lambda: by_bytes(image_bytes=contents)["mos"].numpy(),
    }
    setting = size_text(height, width, batch)
    cases = [
        Case("savedmodel", "Keras model on decoded pixels (tf.function)", setting, "sm_keras", timed(calls["keras"], batch), warmup=calls["keras"]),
        Case("savedmodel", "SavedModel score_pixels (float32 pixels)", setting, "sm_float", timed(calls["float"], batch), warmup=calls["float"]),
        Case("savedmodel", "SavedModel serving_default (JPEG bytes, decode in graph)", setting, "sm_bytes", timed(calls["bytes"], batch), warmup=calls["bytes"],
             note="KonIQ 1024x768 JPEGs decoded and resized inside the signature"),
    ]
    # One call is ~2 s at 384x512: cheap enough for more repeats, which this comparison
    # of two nearly equal times needs on a shared machine.
    measure(cases, max(settings["repeats"], settings["signature_repeats"]))
    del loaded

    cold = []
    for run in range(settings["cold_runs"]):
        for warmup in (False, True):
            argv = [sys.executable, str(HERE / "cold_start.py"), str(version_dir), str(files[0])] + (["--warmup"] if warmup else [])
            log(f"cold start {'with' if warmup else 'without'} warmup, run {run + 1}/{settings['cold_runs']}")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                notes.append(f"cold start failed: {done.stderr.strip()[-300:]}")
                continue
            cold.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return cases, info, cold


def full_decode_and_resize(contents, size):
    """kiqa's decode_image before the DCT-domain JPEG path, rebuilt for comparison:
    header check, EXIF, full decode (TF's default DCT), antialiased resize."""
    shape = imageinfo.check_header(contents, DEFAULT_MAX_PIXELS)
    orientation = imageinfo.exif_orientation(contents)
    with tf.control_dependencies([shape]):
        image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image = imageinfo.apply_orientation(image, orientation)
    image = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def jpeg_decode_alone(blobs, size):
    """TF's JPEG decoder alone, at the DCT scale kiqa picks for these files, to float32.

    The floor of any decoder that runs in a TF graph (the only kind TF Serving can run
    for the bytes signature): no header check, no EXIF turn, no resize. When this alone
    is slower than Pillow's whole pipeline per core, no change to kiqa's own steps can
    reach Pillow. The files share one size (KonIQ's 1024x768), so the scale is fixed.
    """
    shapes = {tuple(int(d) for d in imageinfo.header_shape(blob).numpy()) for blob in blobs}
    if len(shapes) != 1:
        raise ValueError(f"the benchmark's JPEGs differ in size: {sorted(shapes)}")
    (stored_height, stored_width), = shapes
    ratio = jpeg_draft_ratio((stored_width, stored_height), 1, *size)

    def decode(contents, _size):
        image = tf.io.decode_jpeg(contents, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        return tf.cast(image, tf.float32)

    return decode, ratio


def tf_pipeline_case(name, key, function, blobs, size, count, notes):
    options = tf.data.Options()
    options.threading.private_threadpool_size = THREADS
    dataset = (
        tf.data.Dataset.from_tensor_slices(blobs).repeat()
        .map(lambda contents: function(contents, size), num_parallel_calls=THREADS)
        .batch(8).prefetch(2).with_options(options)
    )
    state = {}

    def warmup():
        start = time.perf_counter()
        state["iterator"] = iter(dataset)
        next(state["iterator"])
        notes.append(f"{name} at {size_text(*size)}: first batch after {time.perf_counter() - start:.2f} s "
                     f"(tf.data instantiates and optimises the map function once per iterator)")
        for _ in range(4):
            next(state["iterator"])

    def call():
        for _ in range(count // 8):
            next(state["iterator"])

    return Case("pipeline", name, f"{size_text(*size)}, {THREADS} threads", f"{key}@{size[0]}x{size[1]}",
                timed(call, count // 8 * 8), warmup=warmup)


def pipeline_section(settings, files, simd_python, notes):
    blobs = [Path(f).read_bytes() for f in files]
    count = settings["pipeline_images"]
    workers, cases = [], []
    pillow_workers = [(sys.executable, "Pillow", "pillow")]
    if simd_python:
        pillow_workers.append((simd_python, "Pillow-SIMD", "pillow_simd"))
    try:
        for python, label, key in pillow_workers:
            worker = Worker([python, str(HERE / "pillow_pipeline.py")], label)
            try:
                info = worker.ask(cmd="info")
                worker.ask(cmd="files", paths=[str(f) for f in files])
            except RuntimeError as err:
                notes.append(f"{label} pipeline not measured: {err}")
                worker.close()
                continue
            notes.append(f"{label} worker: {info}")
            workers.append((worker, label, key))
        for size in settings["pipeline"]:
            cases.append(tf_pipeline_case("kiqa decode_image in tf.data", "kiqa_pipeline", decode_image, blobs, size, count, notes))
            cases.append(tf_pipeline_case("tf.data full decode + antialiased resize (kiqa before)", "tf_full", full_decode_and_resize, blobs, size, count, notes))
            floor, ratio = jpeg_decode_alone(blobs, size)
            cases.append(tf_pipeline_case(f"tf.data TF decode_jpeg alone at 1/{ratio} (in-graph floor)", "tf_jpeg_floor",
                                          floor, blobs, size, count, notes))
            for worker, label, key in workers:
                command = dict(cmd="run", threads=THREADS, count=count, size=list(size))
                cases.append(Case("pipeline", f"{label} + draft mode, thread pool", f"{size_text(*size)}, {THREADS} threads",
                                  f"{key}@{size[0]}x{size[1]}", worker_run(worker, count, **command),
                                  warmup=worker_run(worker, count, **dict(command, count=16))))
        measure(cases, settings["repeats"])
    finally:
        for worker, _, _ in workers:
            worker.close()
    return cases


# ----------------------------------------------------------------------------- ratios, table


def ratios(cases, export_info, settings):
    """Ratios of two cases of one run, three ways: medians, best repeats, CPU time.

    On a shared machine the three disagree: other jobs slow some repeats (medians
    drift), the best repeat is the one least disturbed, and images per CPU-second
    ignores time spent descheduled (but counts spin-waiting threads). A target counts
    as met only when all the available measures meet it.
    """
    by_key = {(c.section, c.key): c for c in cases if c.median()}
    rows = []

    def add(name, numerator, denominator, target=None, higher_is_better=True, invert=False, measures=None):
        section = name.split()[0].lower()
        a, b = by_key.get((section, numerator)), by_key.get((section, denominator))
        if a is None or b is None:
            return
        pairs = {
            "median": (a.median(), b.median()),
            "best": (max(a.rates()), max(b.rates())),
            "per_core": (a.cpu_median(), b.cpu_median()),
        }
        values = {}
        for measure, (x, y) in pairs.items():
            if (measures is None or measure in measures) and x and y:
                values[measure] = y / x if invert else x / y
        if not values:
            return
        conservative = min(values.values()) if higher_is_better else max(values.values())
        met = None if target is None else (conservative >= target if higher_is_better else conservative <= target)
        rows.append({"name": name, **values, "conservative": conservative, "target": target,
                     "higher_is_better": higher_is_better, "met": met,
                     "numerator": numerator, "denominator": denominator})

    for height, width, _ in settings["infer"]:
        s = f"@{height}x{width}"
        add(f"inference {height}x{width}: fast / stock Keras", "keras_fast" + s, "keras_stock" + s)
        add(f"inference {height}x{width}: kiqa fast / PyTorch fp32", "keras_fast" + s, "torch_fp32" + s, TARGETS["inference_vs_torch_fp32"])
        add(f"inference {height}x{width}: kiqa fast / PyTorch bf16", "keras_fast" + s, "torch_bf16" + s)
        add(f"inference {height}x{width}: mixed_bfloat16 / float32 Keras", "keras_bf16" + s, "keras_fast" + s)
        add(f"inference {height}x{width}: kiqa fast / PyTorch fp32 on 1 thread, per core", "keras_fast" + s,
            "torch_fp32_1thread" + s, measures=("per_core",))
    for height, width, _, _ in settings["train"]:
        s = f"@{height}x{width}"
        add(f"training {height}x{width}: fast / stock Keras", "keras_fast" + s, "keras_stock" + s)
        add(f"training {height}x{width}: kiqa fast / PyTorch fp32", "keras_fast" + s, "torch_fp32" + s, TARGETS["training_vs_torch_fp32"])
        add(f"training {height}x{width}: kiqa fast / PyTorch bf16", "keras_fast" + s, "torch_bf16" + s)
        add(f"training {height}x{width}: mixed_bfloat16 / float32 Keras", "keras_bf16" + s, "keras_fast" + s)
    for height, width in settings["pipeline"]:
        s = f"@{height}x{width}"
        reference = "pillow_simd" if ("pipeline", "pillow_simd" + s) in by_key else "pillow"
        label = "Pillow-SIMD" if reference == "pillow_simd" else "Pillow (stock; Pillow-SIMD not given)"
        add(f"pipeline {height}x{width}: kiqa / {label}", "kiqa_pipeline" + s, reference + s,
            TARGETS["pipeline_vs_pillow_simd_per_core"])
        if reference == "pillow_simd":
            add(f"pipeline {height}x{width}: kiqa / Pillow stock", "kiqa_pipeline" + s, "pillow" + s)
        add(f"pipeline {height}x{width}: kiqa / full decode + resize (kiqa before)", "kiqa_pipeline" + s, "tf_full" + s)
        add(f"pipeline {height}x{width}: in-graph floor (decode_jpeg alone) / {label}", "tf_jpeg_floor" + s, reference + s)
        add(f"pipeline {height}x{width}: kiqa / in-graph floor (decode_jpeg alone)", "kiqa_pipeline" + s, "tf_jpeg_floor" + s)
    export = size_text(*settings["export_size"])
    add(f"SavedModel {export}: bytes / float signature, time per image", "sm_bytes", "sm_float",
        TARGETS["bytes_vs_float_signature_time"], higher_is_better=False, invert=True)
    add(f"SavedModel {export}: float signature / Keras model, images/s", "sm_float", "sm_keras")
    if export_info:
        value = export_info["export_vs_weights_bytes"]
        target = TARGETS["export_vs_weights_bytes"]
        rows.append({"name": "export size / float32 weights' bytes (whole version dir)", "exact": value,
                     "conservative": value, "target": target, "higher_is_better": False, "met": value <= target})
    return rows


def format_table(cases, ratio_rows, export_info, cold, info):
    lines = []
    header = f"{'case':58s} {'setting':34s} {'img/s':>8s} {'min-max':>15s} {'img/CPU-s':>10s}"
    section = None
    for case in cases:
        if case.section != section:
            section = case.section
            lines += ["", f"== {section} ==", header]
        if case.error or not case.samples:
            lines.append(f"{case.name:58s} {case.setting:34s} {'failed' if case.error else 'skipped':>8s}  {case.error or ''}")
            continue
        rates = case.rates()
        cpu = case.cpu_median()
        lines.append(f"{case.name:58s} {case.setting:34s} {case.median():8.2f} {min(rates):7.2f}-{max(rates):<7.2f} "
                     f"{(f'{cpu:10.2f}' if cpu else ' ' * 10)}")
    if export_info:
        mb = 1e6
        lines += ["", "== export ==",
                  f"weights: {export_info['parameters']:,} parameters = {export_info['weights_raw_bytes'] / mb:.1f} MB float32 "
                  f"(.weights.h5 {export_info['weights_h5_bytes'] / mb:.1f} MB); SavedModel version dir "
                  f"{export_info['version_dir_bytes'] / mb:.1f} MB (variables {export_info['variables_bytes'] / mb:.1f} MB, "
                  f"saved_model.pb {export_info['saved_model_pb_bytes'] / mb:.1f} MB); export took {export_info['export_seconds']:.0f} s"]
    if cold:
        lines += ["", "== cold start (fresh process; seconds) ==",
                  f"{'warmup':8s} {'import TF':>10s} {'load':>8s} {'warmup':>8s} {'1st req':>8s} {'2nd req':>8s} {'load->1st':>10s}"]
        for run in cold:
            lines.append(f"{('yes (' + str(run['warmup_records']) + ')') if run['warmup'] else 'no':8s} "
                         f"{run['import_tensorflow_s']:10.2f} {run['load_s']:8.2f} {run['warmup_s']:8.2f} "
                         f"{run['first_request_s']:8.2f} {run['second_request_s']:8.2f} {run['load_to_first_answer_s']:10.2f}")
    lines += ["", "== ratios (same run; a target is met only if every measure meets it) ==",
              f"{'ratio':66s} {'median':>7s} {'best':>7s} {'per core':>8s} {'target':>7s} {'met':>4s}"]
    for row in ratio_rows:
        cells = []
        for measure in ("median", "best", "per_core"):
            value = row.get(measure, row.get("exact") if measure == "median" else None)
            cells.append(f"{value:7.2f}" if value is not None else " " * 7)
        target = "" if row["target"] is None else ("<=" if not row["higher_is_better"] else ">=") + f"{row['target']}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(f"{row['name']:66s} {cells[0]} {cells[1]} {cells[2]:>8s} {target:>7s} {met:>4s}")
    machine = info["machine"]
    lines += ["", f"machine: {machine['cpu_model']}, {machine['usable_cpus']} cores, {machine['ram_gib']} GiB; "
                  f"load average {machine['load_average_at_start'][0]:.1f} at start, {machine['load_average_at_end'][0]:.1f} at end"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark kiqa (Keras model, SavedModel, input pipeline) against PyTorch and Pillow "
                    "on this machine; prints a table and writes JSON."
    )
    parser.add_argument("--quick", action="store_true", help="224x224 only, fewer repeats (~2 minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per case (default 4, --quick 2; the SavedModel signatures get at least 8 / 4)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON (default {RESULTS})")
    parser.add_argument(
        "--pillow-simd-python", default=os.environ.get("KIQA_PILLOW_SIMD_PYTHON"),
        help="a Python interpreter with Pillow-SIMD and NumPy installed, for the pipeline reference "
             "(Pillow-SIMD replaces Pillow, so it lives in its own environment; default $KIQA_PILLOW_SIMD_PYTHON)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--skip", nargs="*", default=[], choices=["models", "export", "pipeline"],
                        help="sections to leave out")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = dict(SETTINGS[mode])
    if args.repeats:
        settings["repeats"] = args.repeats
    started = datetime.datetime.now()
    wall_start = time.perf_counter()
    info = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            "mode": mode, "started": started.isoformat(timespec="seconds"), "machine": machine_info(),
            "versions": versions(), "settings": settings, "targets": TARGETS}
    notes, cases, export_info, cold = [], [], None, []
    workdir = Path(tempfile.mkdtemp(prefix="kiqa-bench-"))
    torch_worker = None
    try:
        files, source = koniq_sized_jpegs(workdir)
        info["images"] = {"source": source, "files": [str(f) for f in files]}
        fast = None
        if "models" not in args.skip:
            if args.no_torch:
                notes.append("PyTorch reference skipped (--no-torch)")
            elif importlib.util.find_spec("torch") is None:
                notes.append("PyTorch reference not measured: torch is not installed "
                             "(pip install torch==2.13.0; pip install --no-deps timm)")
            else:
                torch_worker = Worker([sys.executable, str(HERE / "torch_reference.py")], "PyTorch worker")
                info["torch"] = torch_worker.ask(cmd="info", threads=tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count())
                log(f"PyTorch reference: {info['torch']['model']}")
            fast, model_cases = model_sections(settings, torch_worker, notes)
            cases += model_cases
            if torch_worker is not None:
                torch_worker.close()
                torch_worker = None
        if "export" not in args.skip:
            # Without the model section (--skip models), the same fast model, built for it.
            fast = fast if fast is not None else build(True)
            try:
                export_cases, export_info, cold = export_sections(fast, settings, files, workdir, notes)
                cases += export_cases
            except Exception as err:  # noqa: BLE001  a failed export is a row of the report, not the end of it
                notes.append(f"export not measured: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                log(notes[-1])
        if "pipeline" not in args.skip:
            cases += pipeline_section(settings, files, args.pillow_simd_python, notes)
    finally:
        if torch_worker is not None:
            torch_worker.close()
        shutil.rmtree(workdir, ignore_errors=True)

    info["machine"]["load_average_at_end"] = list(os.getloadavg())
    info["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    info["duration_s"] = time.perf_counter() - wall_start
    ratio_rows = ratios(cases, export_info, settings)
    info.update(results=[c.to_dict() for c in cases], ratios=ratio_rows, export=export_info,
                cold_start=cold, notes=notes)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{started.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(format_table(cases, ratio_rows, export_info, cold, info))
    for note in notes:
        print(f"note: {note}")
    print(f"\n{info['duration_s'] / 60:.1f} min; JSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
