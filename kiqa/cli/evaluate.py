"""`kiqa-evaluate` / `kiqa evaluate`: re-evaluate a saved model on any KonIQ-format set."""

import argparse
import sys
from pathlib import Path

from kiqa.cli._common import EXIT_OK, entry_point
from kiqa.config import SPLITS, TrainConfig
from kiqa.errors import ConfigError

PARTS = ("test", "val", "train", "all")


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa-evaluate",
        description="Predict a labelled KonIQ-format set with a trained model and report PLCC, "
        "SRCC, KRCC, RMSE, MAE (MOS on 0-100) and PLCC after the 4-parameter logistic fit.",
    )
    parser.add_argument("model", help="a run directory (model.keras + config.json) or a .keras file")
    parser.add_argument("--labels", help="KonIQ-format label CSV (default: the run's own data)")
    parser.add_argument("--images", help="image folder (default: beside the CSV)")
    parser.add_argument("--split", choices=SPLITS, help="how to split the set (default: the run's own)")
    parser.add_argument("--part", choices=PARTS, default="test", help="which part to evaluate (default test)")
    parser.add_argument("--seed", type=int, help="split seed (default: the run's own)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="input size, for a bare .keras file without config.json beside it")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the run's own)")
    parser.add_argument("--out", help="folder for metrics.json, predictions.csv, scatter.png "
                        "(default: <run>/eval-<labels>-<part>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _run_config(model_ref, args):
    model_ref = Path(model_ref)
    model_path = model_ref / "model.keras" if model_ref.is_dir() else model_ref
    config_path = model_path.parent / "config.json"
    if config_path.is_file():
        config = TrainConfig.load(config_path)
    elif args.image_size:
        config = TrainConfig(weights="none")
    else:
        raise ConfigError(
            f"{model_path}: no config.json beside it to say the image size it was trained at; "
            "pass --image-size HEIGHT WIDTH"
        )
    changes = {
        key: value for key, value in dict(
            labels=args.labels, images=args.images, split=args.split, seed=args.seed,
            image_size=args.image_size, batch_size=args.batch_size,
        ).items() if value is not None
    }
    if args.labels and not args.images:
        changes["images"] = None
    if args.labels and args.split is None:
        changes["split"] = "official" if _has_official_split(args.labels) else "random"
    return model_path, config.replace(cache="none", **changes)


def _has_official_split(labels):
    from kiqa.data.koniq import read_labels

    return "set" in read_labels(labels).columns


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa-evaluate`."""
    args = build_parser(prog).parse_args(argv)
    model_path, config = _run_config(args.model, args)
    from kiqa.evaluate import evaluate_saved_model

    out = Path(args.out) if args.out else None
    metrics, out_dir = evaluate_saved_model(model_path, config, part=args.part, out_dir=out, progress=not args.quiet)
    print(
        f"{args.part} ({metrics['n']} images): PLCC {metrics['plcc']:.4f}  SRCC {metrics['srcc']:.4f}  "
        f"KRCC {metrics['krcc']:.4f}  RMSE {metrics['rmse']:.2f}  MAE {metrics['mae']:.2f}  "
        f"PLCC after 4-parameter logistic {metrics['plcc_logistic4']:.4f}"
    )
    print(f"written to {out_dir}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
