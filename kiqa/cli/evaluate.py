"""`kiqa-evaluate` / `kiqa evaluate`: re-evaluate a saved model on a KonIQ file or any labelled CSV."""

import argparse
import sys
from pathlib import Path

from kiqa.cli._common import EXIT_OK, entry_point, print_model_warning
from kiqa.config import ON_BAD_IMAGES, SPLITS, TrainConfig
from kiqa.errors import ConfigError

PARTS = ("test", "val", "train", "all")


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa-evaluate",
        description="Predict a labelled set with a trained model and report PLCC and SRCC with "
        "95% bootstrap confidence intervals, KRCC, RMSE, MAE (MOS on 0-100) and PLCC after the "
        "4-parameter logistic fit, with cautions when there are too few images to mean much. "
        "The set is a KonIQ label file, or any CSV of image paths and scores (--path-column, "
        "--mos-column, --scale).",
    )
    parser.add_argument("model", help="a run directory (model.keras + config.json), a .keras file "
                        "(its run's config.json is found beside it or above checkpoints/), or an "
                        "exported SavedModel or ONNX model (base path or version folder; needs --labels)")
    parser.add_argument("--engine", choices=("tf", "onnxruntime", "openvino"), default="tf",
                        help="what runs the model (as for kiqa score; an ONNX export needs "
                        "onnxruntime or openvino)")
    parser.add_argument("--labels", help="label CSV: a KonIQ file, or any CSV with an image-path and a "
                        "score column (default: the run's own data)")
    parser.add_argument("--images", "--image-root", dest="images",
                        help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    csv_group = parser.add_argument_group("any labelled CSV")
    csv_group.add_argument("--path-column", help="column of image paths (default 'file'); makes --labels "
                           "a plain labelled CSV, evaluated whole")
    csv_group.add_argument("--mos-column", help="column of scores (default 'mos')")
    csv_group.add_argument("--scale", help="range of the scores: 1-5, 0-1, 0-100 or LOW-HIGH (default "
                           "0-100); mapped linearly to 0-100, which leaves correlations unchanged and puts "
                           "RMSE and MAE in 0-100 points")
    parser.add_argument("--split", choices=SPLITS, help="how to split the set (default: the run's own)")
    parser.add_argument("--part", choices=PARTS, help="which part to evaluate (default test; a plain "
                        "labelled CSV is always evaluated whole)")
    parser.add_argument("--seed", type=int, help="split and bootstrap seed (default: the run's own)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="input size, for a bare .keras file without config.json beside it")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the run's own)")
    parser.add_argument("--on-bad-images", choices=ON_BAD_IMAGES,
                        help="drop unusable images (counted in metrics.json) or stop (default: the run's own)")
    parser.add_argument("--max-bad-fraction", type=float,
                        help="stop anyway when more than this share of images is unusable (default: the run's own)")
    parser.add_argument("--out", help="folder for metrics.json, predictions.csv, scatter.png "
                        "(default: <run>/eval-<labels>-<part>-<hash of the label file and settings>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an evaluation in --out made with other labels, settings or weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _run_config(model_ref, args):
    from kiqa.run import resolve_model

    resolved = resolve_model(model_ref)
    config = resolved.config()
    if config is None:
        if resolved.kind != "keras" and not args.labels:
            raise ConfigError(
                f"{resolved.model} is an export: it holds no training config naming its data; "
                "pass the labelled set with --labels"
            )
        if resolved.kind == "keras" and not args.image_size:
            raise ConfigError(
                f"{resolved.model}: no config.json beside it (or above checkpoints/) to say the "
                "image size it was trained at; pass --image-size HEIGHT WIDTH"
            )
        # An export records its own size; the scorer reads it.
        config = TrainConfig(weights="none")
    changes = {
        key: value for key, value in dict(
            labels=args.labels, images=args.images, split=args.split, seed=args.seed,
            image_size=args.image_size, batch_size=args.batch_size, on_bad_images=args.on_bad_images,
            max_bad_fraction=args.max_bad_fraction,
        ).items() if value is not None
    }
    if args.labels and not args.images:
        changes["images"] = None
    if args.labels:  # the given file is read as it is, not as the run's own (plain) CSV was
        changes.update(path_column=None, mos_column=None, scale=None)
    if args.labels and args.split is None and not _is_plain_csv(args):
        changes["split"] = "official" if _has_official_split(args.labels) else "random"
    return resolved, config.replace(cache="none", **changes)


def _is_plain_csv(args):
    """True when --labels is a plain labelled CSV: a column flag was given, or it has no
    `image_name` column (KonIQ's layouts all have one)."""
    from kiqa.data.labelled import is_plain_csv

    return is_plain_csv(args.labels, args.path_column, args.mos_column, args.scale)


def _read_plain_csv(args):
    from kiqa.data.labelled import DEFAULT_SCALE, read_labelled_csv

    if not args.labels:
        raise ConfigError("--path-column, --mos-column and --scale describe a CSV: pass it with --labels")
    if args.part not in (None, "all"):
        raise ConfigError(f"a plain labelled CSV has no split: drop --part {args.part} (it is evaluated whole)")
    return read_labelled_csv(
        args.labels, path_column=args.path_column or "file", mos_column=args.mos_column or "mos",
        scale=args.scale or DEFAULT_SCALE,
    )


def _has_official_split(labels):
    from kiqa.data.koniq import read_labels

    return "set" in read_labels(labels).columns


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa-evaluate`."""
    args = build_parser(prog).parse_args(argv)
    return _evaluate(args, prog)


def _evaluate(args, prog):
    resolved, config = _run_config(args.model, args)
    from kiqa.evaluate import evaluate_saved_model
    from kiqa.metrics import format_report

    labelled = _read_plain_csv(args) if _is_plain_csv(args) else None
    part = "all" if labelled is not None else (args.part or "test")
    out = Path(args.out) if args.out else None
    metrics, out_dir = evaluate_saved_model(
        resolved.given, config, part=part, out_dir=out, progress=not args.quiet, labelled=labelled,
        engine=args.engine, overwrite=args.overwrite,
    )
    labels = metrics["labels"]
    print(f"{labels['file']}, {part}: {metrics['n']} images ({metrics['rejected']} rejected, "
          f"{metrics['failed']} failed to decode); {labels['scores']}")
    for note in labels["notes"]:
        print(f"note: {note}")
    print(format_report(metrics, indent="  "))
    _print_overlap(metrics, prog)
    if "distribution" in metrics:  # a distribution model on labels with c1..c5
        from kiqa.distribution import format_distribution_report

        print(format_distribution_report(metrics["distribution"], indent="  "))
        print("  reliability diagram: reliability.png")
    print(f"written to {out_dir} (metrics.json records the model's provenance under 'model')")
    from kiqa.provenance import find_for_model

    print_model_warning(find_for_model(resolved.model))
    return EXIT_OK


def _print_overlap(metrics, prog):
    """Says, on stderr, how many images the model trained on; prints the held-out metrics."""
    from kiqa.metrics import format_report

    overlap = metrics.get("overlap") or {}
    if not overlap.get("train") and not overlap.get("val"):
        return
    print(f"{prog}: warning: {metrics['cautions'][0]}", file=sys.stderr)
    if metrics.get("held_out"):
        print(f"held out only ({overlap['held_out']} images):")
        print(format_report(metrics["held_out"], indent="  "))
    else:
        print(f"held out only: {overlap['held_out']} image(s), too few for metrics; "
              f"evaluate with --part test")


if __name__ == "__main__":
    sys.exit(main())
