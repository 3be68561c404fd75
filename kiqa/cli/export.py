"""`kiqa-export` / `kiqa export`: publish a trained model as a TF Serving version, atomically."""

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from kiqa.cli._common import EXIT_OK, entry_point, runnable
from kiqa.errors import DefaultImageSizeWarning


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa-export",
        description="Export a trained model as a SavedModel version for TF Serving: "
        "<base>/<integer version>/, with signature serving_default (image_bytes: encoded "
        "JPEG/PNG/... string[-1] -> mos: float[-1], MOS on KonIQ's 0-100 scale, decoded and "
        "resized in the graph exactly as in training) and score_pixels (image: float32 "
        "[-1, H, W, 3] -> mos). The version is written beside the target under a dot-name, "
        "loaded back, checked (signatures, each weight stored once, no file-system ops, "
        "SavedModel vs Keras parity) and only then renamed into place, so TF Serving never "
        "sees a half-written version.",
    )
    parser.add_argument("--format", choices=("savedmodel", "onnx", "litert"), default="savedmodel",
                        help="savedmodel: TF Serving (bytes and pixel signatures); onnx: "
                        "<base>/<version>/model.onnx on float pixels (input image float32 "
                        "[-1, H, W, 3] 0-255, output mos [-1]), needs kiqa[onnx]; litert: "
                        "<base>/<version>/model.tflite (float32) and model_fp16.tflite / "
                        "model_dynamic.tflite (quantised) on float pixels. ONNX and LiteRT "
                        "users decode images themselves: kiqa.serving.preprocess.preprocess_image")
    parser.add_argument("model", metavar="RUN_OR_KERAS",
                        help="a run directory (model.keras + config.json) or a .keras file")
    parser.add_argument("--base", default=None,
                        help="model base path; its last folder is the model name TF Serving "
                        "serves (default export/kiqa, export/kiqa-onnx, export/kiqa-litert)")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: one more than the highest existing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing version (TF Serving does not reload a version "
                        "number it already serves: publish a new number to roll out)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="size the signatures resize images to (default: the run's "
                        "config.json; 384 512 for a bare .keras file)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="the bytes signature rejects images whose header announces more "
                        "pixels (INVALID_ARGUMENT) before decoding (default: the run's, 64000000)")
    parser.add_argument("--parity-images", nargs="+", metavar="PATH", default=None,
                        help="image files or folders the SavedModel and the Keras model must "
                        "agree on (generated images are always added)")
    parser.add_argument("--unsafe", action="store_true",
                        help="load .keras files with Lambda layers (arbitrary code) and publish a "
                        "SavedModel using ops outside kiqa's allow list: only for models you reviewed")
    return parser


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa export`."""
    args = build_parser(prog).parse_args(argv)
    if args.format != "savedmodel":
        return _export_other(args)
    from kiqa.serving import export, savedmodel

    base = args.base or export.DEFAULT_BASE_PATH
    print(f"exporting {args.model} to {base}/ ...", file=sys.stderr)
    path = _run(export.export_model, args, base)
    info = savedmodel.read_export_metadata(path)
    parity = info["parity"]
    height, width = info["image_size"]
    print(f"exported version {info['version']} of model {info['model_name']!r} to {path}")
    print(f"  image size {height}x{width}, header pixel cap {info['max_pixels']}")
    print(
        f"  weights: {info['parameters']:,} parameters stored once "
        f"({info['variables_bytes'] / 1e6:.1f} MB of variables)"
    )
    print(
        f"  parity: max |SavedModel - Keras| = {max(parity['max_abs_diff_bytes'], parity['max_abs_diff_pixels']):.2g} "
        f"MOS on {parity['images']} images (tolerance {parity['tolerance']})"
    )
    if info["xla_must_compile_functions"]:
        print(
            f"  note: {info['xla_must_compile_functions']} functions must be XLA-compiled (stock "
            f"grouped Conv2D); on a CPU server that is slow, retrain with fast depthwise",
            file=sys.stderr,
        )
    print(f"TF Serving watching {base} loads it at its next poll (serving/README.md); to try it on this "
          f"machine: {runnable('kiqa serve-dev')} --base {shlex.quote(str(base))}, then in another shell "
          f"{runnable('kiqa predict')} IMAGES... --model {shlex.quote(Path(base).name)}")
    return EXIT_OK


def _run(exporter, args, base):
    """Runs one format's exporter with the flags; prints kiqa's warnings, phrases the flags."""
    from kiqa.serving.export import ExportOptions

    options = ExportOptions(
        base_path=base, version=args.version, image_size=args.image_size, max_pixels=args.max_pixels,
        overwrite=args.overwrite, parity_images=args.parity_images, safe_mode=not args.unsafe,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = exporter(args.model, options)
    for warning in caught:
        if issubclass(warning.category, UserWarning) and "kiqa" in warning.filename:
            hint = " (--image-size H W)" if issubclass(warning.category, DefaultImageSizeWarning) else ""
            print(f"warning: {warning.message}{hint}", file=sys.stderr)
    return path


def _export_other(args):
    """`--format onnx|litert`: kiqa.serving.onnx / kiqa.serving.litert."""
    if args.format == "onnx":
        from kiqa.serving import onnx as exporter

        run = exporter.export_onnx
    else:
        from kiqa.serving import litert as exporter

        run = exporter.export_litert
    base = args.base or exporter.DEFAULT_BASE_PATH
    print(f"exporting {args.model} as {args.format} to {base}/ ...", file=sys.stderr)
    path = _run(run, args, base)
    from kiqa.serving import artifact

    info = artifact.read_metadata(path)
    height, width = info["image_size"]
    print(f"exported version {info['version']} of model {info['model_name']!r} ({args.format}) to {path}")
    print(f"  input {info['input']['name']} float32 [-1, {height}, {width}, 3] (0-255 RGB), "
          f"output {info['output']['name']} float32 [-1] (MOS 0-100)")
    for output in info.get("extra_outputs", []):
        print(f"  output {output['name']} float32 {output['shape']}: {output['meaning']}")
    for name, figures in info["parity"].items():
        srcc = f", SRCC {figures['srcc']:.4f}" if figures.get("srcc") is not None else ""
        # A distribution model's mos_sd and shares are no MOS, and its shares count five a photo.
        spread = name.endswith(("_mos_sd", "_dist"))
        print(f"  parity {name}: max {'|d|' if spread else '|dMOS|'} = {figures['max_abs_diff']:.2g} on "
              f"{figures['images']} {'values' if spread else 'images'} (tolerance "
              f"{figures['tolerance']:.3g}){srcc}")
    for name, size in info.get("files", {info.get("file"): info.get("file_bytes")}).items():
        print(f"  {name}: {size / 1e6:.2f} MB")
    print("  preprocess images as kiqa.serving.preprocess.preprocess_image does (kiqa.json: preprocessing)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
