"""Every CPU engine that can run kiqa's model, side by side with PyTorch, in one run.

    python benchmarks/engines.py                     # 384x512, batch 8, 5 repeats (~6-10 min)
    python benchmarks/engines.py --onnx /tmp/m.onnx  # reuse a converted file (saves ~80 s)

ConvNeXt-Tiny with random weights (seed 0) and kiqa's one-output head, fast depthwise
path, at 384x512 (KonIQ's training size), batch 8:

- TensorFlow fp32: `tf.function(model(x))`, what `kiqa score --engine tf` runs;
- ONNX Runtime fp32 and OpenVINO f32 on the file `kiqa.serving.onnx.convert` writes
  (what `--engine onnxruntime|openvino` runs);
- OpenVINO bf16 as `--engine openvino-bf16` runs it (backbone in bf16, the head after
  the global pool in float32; `kiqa.serving.engines`), a gain only on CPUs with
  AVX512_BF16 or AMX (the JSON records the CPU flags);
- PyTorch eager fp32 and bf16 channels-last (autocast), in a child process
  (benchmarks/torch_reference.py) so thread pools never share a process.

Each engine is warmed up, then the repeats are interleaved (repeat 1 of every engine,
then repeat 2 ...), so load from other jobs on a shared machine hits all alike. Parity:
max |ΔMOS| of each engine against TF fp32 on the same pixel batch (PyTorch's model is a
different copy with different random weights, so it has none). Every ratio is the ratio
of medians, with its spread: the min-max of the per-repeat ratios (repeat i of one
engine against repeat i of the other, which ran next to it). Prints a table, writes
results/engines-<time>.json with the CPU model and flags (AVX512_BF16, AMX).
"""

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from kiqa.config import TrainConfig  # noqa: E402
from kiqa.model import build_model  # noqa: E402
from machine import machine_info  # noqa: E402

BF16 = "OpenVINO bf16, f32 head (kiqa openvino-bf16)"


def tf_engine(model, size):
    @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)])
    def predict(x):
        return model(x, training=False)["mos"]

    return lambda x: predict(tf.constant(x)).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onnx", type=Path, default=None, help="an ONNX file of the same model (seed 0)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    size, batch = tuple(args.size), args.batch
    started = time.time()
    load_start = os.getloadavg()[0]
    keras.utils.set_random_seed(0)
    model = build_model(TrainConfig(weights="none", image_size=size))
    x = np.random.default_rng(0).uniform(0, 255, (batch, *size, 3)).astype(np.float32)
    engines, notes = {"TensorFlow fp32 (kiqa default)": tf_engine(model, size)}, []

    onnx_file = args.onnx
    if onnx_file is None and importlib.util.find_spec("tf2onnx"):
        from kiqa.serving import onnx as kiqa_onnx

        onnx_file = Path(tempfile.mkdtemp(prefix="kiqa-engines-")) / "model.onnx"
        t = time.perf_counter()
        kiqa_onnx.convert(model, onnx_file, size)
        notes.append(f"ONNX conversion of ConvNeXt-Tiny at {size[0]}x{size[1]}: {time.perf_counter() - t:.0f} s")
    if onnx_file is not None:
        from kiqa.serving import engines as kiqa_engines

        for name, label in (("onnxruntime", "ONNX Runtime fp32"), ("openvino", "OpenVINO f32")):
            try:
                engines[label] = kiqa_engines.onnx_predictor(onnx_file, name)[0]
            except Exception as err:  # an engine not installed is a note, not a failure
                notes.append(f"{label} not measured: {err}")
        if "OpenVINO f32" in engines:
            engines[BF16] = kiqa_engines._openvino(onnx_file, None, precision="bf16")[0]
    else:
        notes.append("ONNX engines not measured: tf2onnx is not installed (pip install 'kiqa[onnx]')")

    worker = None
    if not args.no_torch and importlib.util.find_spec("torch"):
        from run import Worker

        worker = Worker([sys.executable, str(HERE / "torch_reference.py")], "PyTorch worker")
        info = worker.ask(cmd="info", threads=os.cpu_count())
        notes.append(f"PyTorch {info['torch_version']}, {info['model']}, {info['threads']} threads")
        for precision, label in (("fp32", "PyTorch eager fp32"), ("bf16", "PyTorch eager bf16 channels-last")):
            engines[label] = (lambda p: lambda _: worker.ask(cmd="infer", precision=p, batch=batch,
                                                             size=list(size), iters=1))(precision)
    elif not args.no_torch:
        notes.append("PyTorch not measured: pip install torch==2.13.0")

    reference = engines["TensorFlow fp32 (kiqa default)"](x)
    parity = {}
    for label, run in engines.items():
        out = run(x)  # warm-up, and the parity sample
        if not label.startswith("PyTorch"):
            parity[label] = float(np.max(np.abs(np.reshape(out, [-1]) - reference)))
    samples = {label: [] for label in engines}
    for _ in range(args.repeats):
        for label, run in engines.items():
            t = time.perf_counter()
            reply = run(x)
            seconds = time.perf_counter() - t
            if isinstance(reply, dict):  # the PyTorch worker times itself (no pipe overhead)
                seconds = sum(reply["seconds"])
            samples[label].append(batch / seconds)
    if worker is not None:
        worker.close()

    medians = {label: statistics.median(v) for label, v in samples.items()}
    best_kiqa = max((l for l in medians if not l.startswith("PyTorch") and l != BF16), key=medians.get)

    def ratio(label, other):
        per_repeat = [a / b for a, b in zip(samples[label], samples[other])]
        return medians[label] / medians[other], min(per_repeat), max(per_repeat)

    print(f"\nConvNeXt-Tiny {size[0]}x{size[1]}, batch {batch}, {args.repeats} interleaved repeats, "
          f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}\n")
    ratio_cols = [l for l in ("PyTorch eager fp32", "PyTorch eager bf16 channels-last") if l in medians]
    print("| engine | img/s median (min-max) | max abs dMOS vs TF fp32 | "
          + " | ".join(f"x {c}" for c in ratio_cols) + " |")
    print("|---|---|---|" + "---|" * len(ratio_cols))
    for label, values in samples.items():
        ratios = " | ".join("{:.2f} ({:.2f}-{:.2f})".format(*ratio(label, c)) for c in ratio_cols)
        dmos = f"{parity[label]:.2g}" if label in parity else "-"
        print(f"| {label} | {medians[label]:.2f} ({min(values):.2f}-{max(values):.2f}) | {dmos} | {ratios} |")
    print(f"\nbest kiqa float32 engine (0.05 MOS parity): {best_kiqa}")
    cpu = machine_info()
    print(f"CPU: {cpu['cpu_model']}, flags {', '.join(cpu['cpu_flags_of_interest'])}")
    for note in notes:
        print(f"note: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"engines-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({
        "size": list(size), "batch": batch, "repeats": args.repeats, "samples": samples,
        "medians": medians, "parity_vs_tf": parity,
        "ratios": {label: {c: ratio(label, c) for c in ratio_cols} for label in samples},
        "machine": cpu, "notes": notes, "cpu_count": os.cpu_count(),
        "load_average": [load_start, os.getloadavg()[0]], "seconds": round(time.time() - started),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }, indent=2) + "\n")
    print(f"wrote {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
