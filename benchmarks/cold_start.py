"""Cold start of an exported SavedModel, in a fresh process: import, load, first answers.

Run by benchmarks/run.py as `python benchmarks/cold_start.py VERSION_DIR IMAGE [--warmup]`;
prints one JSON line. With --warmup the records of `assets.extra/tf_serving_warmup_requests`
are replayed after loading, as TF Serving does before it reports a version AVAILABLE, so
the first real request finds its graph already instantiated. Each phase is timed on its
own: what TF Serving adds on top (its C++ load path, batching) cannot be measured here,
as its binary does not install on these machines.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", help="an export version directory, e.g. export/kiqa/1")
    parser.add_argument("image", help="an encoded image file sent as the first request")
    parser.add_argument("--warmup", action="store_true", help="replay the warmup records first")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import tensorflow as tf

    imported = time.perf_counter()
    loaded = tf.saved_model.load(args.version_dir)
    signature = loaded.signatures["serving_default"]
    load_done = time.perf_counter()

    warmup_records = 0
    if args.warmup:
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(args.version_dir, "assets.extra", "tf_serving_warmup_requests")
        for record in tf.data.TFRecordDataset(path):
            request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
            function = loaded.signatures[request.model_spec.signature_name or "serving_default"]
            inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
            function(**inputs)["mos"].numpy()
            warmup_records += 1
    warmup_done = time.perf_counter()

    with open(args.image, "rb") as handle:
        contents = tf.constant([handle.read()])
    first = float(signature(image_bytes=contents)["mos"].numpy()[0])
    first_done = time.perf_counter()
    signature(image_bytes=contents)["mos"].numpy()
    second_done = time.perf_counter()

    print(json.dumps({
        "warmup": args.warmup,
        "warmup_records": warmup_records,
        "import_tensorflow_s": imported - start,
        "load_s": load_done - imported,
        "warmup_s": warmup_done - load_done,
        "first_request_s": first_done - warmup_done,
        "second_request_s": second_done - first_done,
        "load_to_first_answer_s": first_done - imported,
        "first_mos": first,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
