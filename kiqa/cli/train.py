"""`kiqa-train` / `kiqa train`: fine-tune ConvNeXt on KonIQ-10k or the built-in demo data.

Settings resolve in this order: the defaults (the real KonIQ run when --labels is given,
the small demo run otherwise), then a JSON config file (--config), then flags. The
resolved config is written to the run directory as config.json.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from kiqa import provenance
from kiqa.cli._common import EXIT_OK, entry_point, print_model_warning, runnable
from kiqa.errors import ConfigError
from kiqa.config import (
    BACKBONES, CACHES, MONITORS, ON_BAD_IMAGES, SPLITS, STRATEGIES, VARIANTS, TrainConfig,
)
from kiqa.contract import DEFAULT_MAX_PIXELS, HEADS


# Over 60 lines: one flat list of every flag in its argument group, read top to bottom like --help.
def build_parser(prog=None):
    """The argument parser; every default is None so a given flag can be told apart."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa-train",
        description="Fine-tune a keras.applications ConvNeXt with a Dense regression head to "
        "predict mean opinion scores (MOS on KonIQ's 0-100 scale, higher is better). With no "
        "--labels it trains on kiqa's built-in demo data (not KonIQ) with small settings.",
    )
    parser.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory instead of resuming or refusing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own start-up and C++ log lines (hidden by default; "
                        "KIQA_VERBOSE=1 does the same for every kiqa command)")

    data = parser.add_argument_group("data")
    data.add_argument("--labels", help="KonIQ label CSV: koniq10k_distributions_sets.csv (0-100 'MOS' + "
                      "official 'set' split) or koniq10k_scores_and_distributions.csv (0-100 'MOS_zscore'), "
                      "or any CSV with an image-path and a score column (--path-column, --mos-column, --scale)")
    data.add_argument("--images", "--image-root", dest="images",
                      help="image folder the CSV's image paths are relative to (default: the CSV's folder, "
                      "or for a KonIQ file its 1024x768/ or 512x384/ subfolder)")
    data.add_argument("--path-column", help="column of image paths (default 'file'); makes --labels a plain "
                      "labelled CSV, read as `kiqa evaluate` reads it (also when it has no image_name column)")
    data.add_argument("--mos-column", help="column of scores of a plain labelled CSV (default 'mos')")
    data.add_argument("--scale", help="range of those scores: 1-5, 0-1, 0-100 or LOW-HIGH (default 0-100), "
                      "mapped linearly to 0-100; without a 'set' column the split is random (seeded by --seed)")
    data.add_argument("--split", choices=SPLITS, help="official (KonIQ's 7058/1000/2015 'set' column; "
                      "default with --labels), random (one seeded split) or repeated (--repeats seeded splits)")
    data.add_argument("--test-fraction", type=float, help="held-out share for random splits "
                      "(0.2 = the literature's 80/20; the KonIQ paper used 0.3)")
    data.add_argument("--val-fraction", type=float, help="share of training carved out for early stopping")
    data.add_argument("--repeats", type=int, help="number of seeded splits with --split repeated "
                      "(reported as median and spread, the literature's protocol)")
    data.add_argument("--seed", type=int, help="seeds splits, shuffling, augmentation and init")
    data.add_argument("--on-bad-images", choices=ON_BAD_IMAGES,
                      help="drop unusable images (listed in rejects.csv) or stop before training")
    data.add_argument("--max-bad-fraction", type=float,
                      help="stop anyway when more than this share of images is unusable (default 0.01)")
    data.add_argument("--max-pixels", type=int,
                      help=f"reject images whose header announces more pixels (default {DEFAULT_MAX_PIXELS})")
    data.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                      help="whole image resized to this, no crop (default 384 512: KonIQ's 4:3 aspect kept)")
    data.add_argument("--no-hflip", dest="hflip", action="store_false", default=None,
                      help="no random horizontal flips (the only augmentation: it does not change quality)")
    data.add_argument("--prepared", metavar="DIR",
                      help="a folder made by `kiqa prepare --out DIR` to read the training images from "
                      "(default: <labels folder>/prepared-HEIGHTxWIDTH when it exists and matches)")
    data.add_argument("--cache", help=f"decoded-image cache: {' or '.join(CACHES)} or a folder for a file cache")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES,
                       help="convnext (default: the real model) or small-cnn, a plain CNN from random "
                       "weights for offline teaching and testing: it learns the demo task in minutes "
                       "but its scores are never meaningful quality predictions")
    model.add_argument("--variant", choices=VARIANTS, help="ConvNeXt size (default tiny)")
    model.add_argument("--weights", help="imagenet (downloaded by Keras), none (random init), or a path "
                       "to a Keras weights file of the backbone")
    model.add_argument("--stock-depthwise", dest="fast_depthwise", action="store_false", default=None,
                       help="keep Keras' grouped Conv2D for the 7x7 depthwise convolutions (4-5x slower on CPU)")
    model.add_argument("--dropout", type=float, help="dropout before the Dense head")
    model.add_argument("--head", choices=HEADS,
                       help="regression (default: one MOS) or distribution: the shares of KonIQ's five "
                       "rating levels (needs c1..c5 in the labels, as both KonIQ files and the demo have), "
                       "giving mos, mos_sd (spread of people's ratings, 0-100 points) and p1..p5")
    model.add_argument("--mos-loss-weight", type=float,
                       help="distribution head: weight of the MSE on MOS/100 beside the squared EMD (default 1)")
    model.add_argument("--sd-loss-weight", type=float,
                       help="distribution head: weight of the squared error of mos_sd/100, the raters' "
                            "spread, beside the squared EMD (default 30)")

    fit = parser.add_argument_group("training")
    fit.add_argument("--epochs", type=int, help="maximum epochs (early stopping usually ends sooner)")
    fit.add_argument("--warmup-epochs", type=int, help="head-only epochs before unfreezing the backbone")
    fit.add_argument("--batch-size", type=int, help="global batch size")
    fit.add_argument("--learning-rate", type=float, help="Adam learning rate")
    fit.add_argument("--epsilon", type=float, help="Adam epsilon")
    fit.add_argument("--patience", type=int, help="early-stopping patience; best weights are restored")
    fit.add_argument("--monitor", choices=MONITORS, help="early stopping and best checkpoint (default val_srcc)")
    fit.add_argument("--mixed-precision", action="store_true", default=None,
                     help="mixed_float16 compute (for GPUs; runs on CPU without a gain)")
    fit.add_argument("--xla", dest="jit_compile", action="store_true", default=None,
                     help="XLA-compile the train step (for GPUs; no gain measured on CPU)")
    fit.add_argument("--strategy", choices=STRATEGIES,
                     help="auto (default), one-device, mirrored (every GPU of one host) or multi-worker on "
                     "TensorFlow; data-parallel (one process per host or GPU, several hosts) on JAX")

    dist = parser.add_argument_group(
        "backend and processes",
        "Keras' backend is chosen before Keras loads. A data-parallel run starts one kiqa-train per "
        "process with the same flags; the three values below can come from the environment instead: "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES, KERAS_DISTRIBUTION_PROCESS_ID, "
        "or under SLURM from SLURM_JOB_NODELIST, SLURM_NTASKS and SLURM_PROCID "
        "(on a Kubernetes Indexed Job or JobSet, the index from JOB_COMPLETION_INDEX)",
    )
    dist.add_argument("--backend", choices=BACKENDS,
                      help="Keras backend (default: $KERAS_BACKEND, else tensorflow); jax needs kiqa[jax]")
    dist.add_argument("--coordinator-address", metavar="HOST:PORT",
                      help="process 0's host and a free port, the same on every process")
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    dist.add_argument("--process-id", type=int, metavar="I",
                      help="this process' index, 0..N-1; process 0 writes the run directory")

    out = parser.add_argument_group("output")
    out.add_argument("--run-dir", help="output folder (default runs/<name>); rerunning resumes there")
    out.add_argument("--name", help="run name (default koniq, or demo without --labels)")
    return parser


# Flags of this process, not of the run: the same config trains on any backend and any
# number of processes (config.json does not record them).
PROCESS_FLAGS = ("backend", "coordinator_address", "num_processes", "process_id")
BACKENDS = ("tensorflow", "jax")


def select_backend(requested):
    """Sets KERAS_BACKEND for this process before Keras is imported.

    Args:
        requested: the --backend value, or None for $KERAS_BACKEND (else tensorflow).

    Returns:
        The backend name.

    Raises:
        ConfigError: Keras is already loaded with another backend (in-process callers).
    """
    backend = requested or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise ConfigError(
                f"Keras is already loaded with the {keras.backend.backend()} backend in this process; "
                f"--backend {backend} must be chosen before Keras loads (run kiqa-train in a new process)"
            )
    os.environ["KERAS_BACKEND"] = backend
    return backend


def resolve_config(args):
    """Defaults, then --config, then flags: the one TrainConfig the run uses."""
    fields = {}
    if args.config:
        fields.update(TrainConfig.load(args.config).to_dict())
    flags = {
        key: value for key, value in vars(args).items()
        if value is not None and key not in ("config", "overwrite", "quiet", "verbose") + PROCESS_FLAGS
    }
    fields.update(flags)
    if fields.get("backbone") == "small-cnn":
        fields.setdefault("weights", "none")  # the small CNN has no pretrained weights
    if fields.get("weights") not in (None, "imagenet", "none"):
        fields["weights"] = str(fields["weights"])
    if fields.get("labels"):
        _plain_csv_fields(fields)
        return TrainConfig.from_dict(fields, source="flags")
    fields.pop("labels", None)
    return TrainConfig.demo(**fields)


def _plain_csv_fields(fields):
    """For a plain labelled CSV: its columns and scale (defaults filled in, so config.json
    says how it was read) and, when it has no `set` column and no split was asked for, a
    seeded random split."""
    from kiqa.data.labelled import PLAIN_DEFAULTS, has_set_column, is_plain_csv

    given = {key: fields.get(key) for key in PLAIN_DEFAULTS}
    if not is_plain_csv(fields["labels"], **given):
        return
    for key, default in PLAIN_DEFAULTS.items():
        fields[key] = given[key] if given[key] is not None else default
    if "split" not in fields and not has_set_column(fields["labels"]):
        fields["split"] = "random"


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa-train`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config = resolve_config(args)
    if config.prepared and not config.labels:
        raise ConfigError("--prepared needs --labels: a prepared set is made from a label file by "
                          "`kiqa prepare LABELS.csv --out DIR`")
    select_backend(args.backend)  # before kiqa.train imports Keras
    from kiqa.distribute import Cluster
    from kiqa.train import caveats, train

    cluster = Cluster.from_environment(coordinator_address=args.coordinator_address,
                                       num_processes=args.num_processes, process_id=args.process_id)

    # Once, before training: they say what the numbers at the end will mean.
    for note in caveats(config):
        print(f"{parser.prog}: note: {note}\n", file=sys.stderr)
    print(f"run directory: {config.resolved_run_dir}", file=sys.stderr)
    # A typed error's flags to fix it are in kiqa.cli.remedies (printed by entry_point).
    result = train(config, overwrite=args.overwrite, progress=not args.quiet, log=_tell, cluster=cluster)
    if result.prepared_dir:
        print(f"training images were read from the prepared set {result.prepared_dir}")
    if len(result.rejects):
        print(f"{len(result.rejects)} image(s) were rejected; see {result.run_dir / 'rejects.csv'}")
    _print_metrics(result)
    print_model_warning(provenance.read(result.run_dir / provenance.FILE_NAME))
    print("\n" + "\n".join(next_steps(result, config)))
    return EXIT_OK


def next_steps(result, config):
    """What to run after training, with this run's real paths (lines to print).

    Args:
        result: the `kiqa.train.TrainResult`.
        config: the run's `TrainConfig`.

    Returns:
        Lines: `kiqa score`, `kiqa evaluate` and `kiqa export` commands and, for the demo,
        where its data lives.
    """
    from kiqa.data import koniq, synthetic

    labels = (Path(config.labels) if config.labels else synthetic.demo_dataset()).resolve()
    if config.images:
        images = Path(config.images)
    else:  # where kiqa.data.validate.check_labels looked
        images = labels.parent if config.path_column else koniq.default_image_root(labels)
    model = result.run_dir
    lines = ["next steps:"]
    if result.model_path is None:  # repeated splits: one model per split folder
        models = sorted(result.run_dir.glob("*/model.keras"))
        if not models:
            return []
        model = models[0].parent
        lines.append(f"  (one model per split: {len(models)} in {result.run_dir}/*/; the first is used here)")
    q = shlex.quote
    # Held-out images only, with the run's own labels and split (its config.json): the
    # train and val parts would overstate the model. The program as this user runs it:
    # an unactivated venv has no `kiqa` on PATH.
    lines += [
        f"  {runnable('kiqa score')} {q(str(images))} --model {q(str(model))} --out {q(str(model / 'scores.csv'))}",
        f"  {runnable('kiqa evaluate')} {q(str(model))} --part test",
        f"  {runnable('kiqa export')} {q(str(model))}        # writes export/kiqa/<next version>/ for TF Serving",
    ]
    if config.labels is None:
        lines.append(f"  the demo data: {labels} (labels) and {images}/ (images); "
                     f"KIQA_HOME moves it (now {synthetic.default_demo_dir().parent})")
    return lines


def _tell(message):
    print(message, file=sys.stderr)


def _print_metrics(result):
    metrics = result.metrics
    print(f"\nresults in {result.run_dir}")
    if "plcc" in metrics:
        from kiqa.metrics import format_report

        print(f"test ({metrics['n']} images):")
        print(format_report(metrics, indent="  "))
        if "distribution" in metrics:
            from kiqa.distribution import format_distribution_report

            print(format_distribution_report(metrics["distribution"], indent="  "))
    else:
        print("test metrics over the repeated splits (median [min, max]):")
        for name, stats in metrics.items():
            print(f"  {name:<15} {stats['median']:.4f}  [{stats['min']:.4f}, {stats['max']:.4f}]")


if __name__ == "__main__":
    sys.exit(main())
