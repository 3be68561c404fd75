"""Does the distribution head learn the raters' spread? Issue #22's demo-data proof over seeds.

For each seed and fold (a pair of demo photos held out, tests/demo_fit.py FOLDS): train the
small CNN with `head="distribution"` (for each `--sd-loss-weights` value) and with the
regression head, each in a fresh deterministic process (tests/spread_proof.py: the recipe
of the large test), and report on the held-out photos
the SRCC of the predicted spread `mos_sd` against the true one, EMD, JS divergence, the
share of true votes inside the 50% and 90% intervals, and the MOS SRCC of both heads.
Prints a table; writes JSON and CSV.

    python benchmarks/spread_seeds.py --seeds 1 2 3 [--folds 0 1 2 3] [--sd-loss-weights 0 1] [--out DIR]
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import pandas as pd  # noqa: E402

import spread_proof  # noqa: E402  (tests/spread_proof.py: the recipe and the deterministic run)
from machine import machine_info  # noqa: E402

COLUMNS = ("head", "sd_loss_weight", "seed", "fold", "held_out", "srcc", "sd_srcc", "sd_plcc", "emd", "js", "votes_in_50",
           "votes_in_90", "seconds")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(len(spread_proof.demo_fit.FOLDS))),
                        help="indices of tests/demo_fit.py FOLDS to hold out in turn")
    parser.add_argument("--sd-loss-weights", type=float, nargs="+", default=[None],
                        help="spread-term weights to train with in turn (default: kiqa's)")
    parser.add_argument("--no-regression", action="store_true", help="skip the regression head's runs")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="kiqa-spread-") as root:
        runs = [("distribution", weight) for weight in args.sd_loss_weights]
        runs += [] if args.no_regression else [("regression", None)]
        total = len(runs) * len(args.seeds) * len(args.folds)
        for seed in args.seeds:
            for fold in args.folds:
                for head, weight in runs:
                    started = time.monotonic()
                    facts = spread_proof.train_in_subprocess(root, seed, fold, head, weight)
                    facts["seconds"] = round(time.monotonic() - started, 1)
                    facts["held_out"] = "+".join(facts["held_out"])
                    rows.append({key: facts.get(key) for key in COLUMNS})
                    print(f"[{len(rows)}/{total}] {head} seed {seed} fold {fold}"
                          + (f" sd weight {facts['sd_loss_weight']:g}" if head == "distribution" else "")
                          + f": MOS SRCC {facts['srcc']:.3f}"
                          + (f", SD SRCC {facts['sd_srcc']:.3f}" if "sd_srcc" in facts else ""), flush=True)

    table = pd.DataFrame(rows, columns=COLUMNS)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    table.to_csv(args.out / f"spread_seeds-{stamp}.csv", index=False)
    (args.out / f"spread_seeds-{stamp}.json").write_text(json.dumps(dict(
        recipe=spread_proof.RECIPE, machine={**machine_info(), "load_average_end": os.getloadavg()}, rows=rows), indent=2))
    print(f"wrote {args.out / f'spread_seeds-{stamp}.csv'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
