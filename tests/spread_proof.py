"""The distribution head's proof on demo data (issue #22), shared by tests/test_distribution.py
and benchmarks/spread_seeds.py: does the small CNN with `head="distribution"` rank the
raters' spread on photos it never saw, while its MOS stays as good as the regression head's?

Each run is tests/demo_fit.py's deterministic recipe (kiqa's model and the head's losses,
mirrors and channel orders) in a fresh process, holding out one pair of photos
(`demo_fit.FOLDS`): every photo is held out once over the four folds, so no figure rests on
which photos a seed happened to leave out.

Usage: python spread_proof.py train ROOT --seed N --fold K --head distribution|regression [--sd-loss-weight W]
  Writes the demo data under ROOT/demo (kept if there), the run (model.keras, config.json)
  under ROOT/<head>-<seed>-fold<K>[-sdW] and prints the held-out figures as one JSON line.
  Without --sd-loss-weight the distribution head trains with kiqa's default.
"""

import argparse
import json
import sys
from pathlib import Path

import demo_fit

# 48x64 demo images, 8 crops of each of the 8 photos (1,024 images; 768 trained on), 24 epochs.
RECIPE = dict(widths=(16, 32, 48), crops_per_photo=8, size=(48, 64), epochs=24, batch_size=32,
              learning_rate=2e-3, permute=True, crop=None)


def run_name(head, seed, fold, sd_loss_weight):
    return f"{head}-{seed}-fold{fold}" + (f"-sd{sd_loss_weight:g}" if sd_loss_weight is not None else "")


def train_run(root, seed, fold, head, sd_loss_weight=None):
    """Trains one run deterministically in this process (call it in a fresh one).

    Returns:
        dict of the held-out figures (the photos of `demo_fit.FOLDS[fold]`, none of whose
        crops were trained on): n, held_out, srcc (MOS) and, for the distribution head,
        sd_srcc, sd_plcc, emd, js and the 50% / 90% interval coverages of the true votes
        (`kiqa.distribution.evaluate_distributions`, what training and `kiqa evaluate` report).
    """
    from kiqa import metrics
    from kiqa.data import koniq
    from kiqa.distribution import evaluate_distributions

    held_out = sorted(demo_fit.FOLDS[fold])
    run_dir = Path(root) / run_name(head, seed, fold, sd_loss_weight)
    model, config, frame, pixels, test = demo_fit.fit_demo_cnn(root, seed, held_out, RECIPE, run_dir, head=head,
                                                               sd_loss_weight=sd_loss_weight)
    predicted = model.predict(pixels[test], batch_size=64, verbose=0)
    true_mos = frame.MOS_zscore.to_numpy()[test]
    facts = dict(head=head, seed=seed, fold=fold, held_out=held_out, n=int(test.sum()),
                 srcc=metrics.srcc(true_mos, predicted["mos"]), run_dir=str(run_dir))
    if head == "distribution":
        judged = evaluate_distributions(koniq.require_shares(frame[test]), true_mos, predicted["dist"],
                                        predicted["mos_sd"])
        facts.update(sd_loss_weight=config.sd_loss_weight, sd_srcc=judged["sd_srcc"], sd_plcc=judged["sd_plcc"],
                     emd=judged["emd"], js=judged["js"],
                     votes_in_50=judged["coverage"]["0.5"]["votes"], votes_in_90=judged["coverage"]["0.9"]["votes"])
    return facts


def train_in_subprocess(root, seed, fold, head, sd_loss_weight=None):
    """`train_run` in a fresh Python process; returns its figures."""
    spread = [] if sd_loss_weight is None else ["--sd-loss-weight", sd_loss_weight]
    return demo_fit.run_script(Path(__file__).resolve(), ["train", root, "--seed", seed, "--fold", fold,
                                                         "--head", head, *spread])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("root", type=Path)
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--fold", type=int, choices=range(len(demo_fit.FOLDS)), required=True)
    run.add_argument("--head", choices=("distribution", "regression"), required=True)
    run.add_argument("--sd-loss-weight", type=float, help="default: kiqa's (TrainConfig.sd_loss_weight)")
    args = parser.parse_args(argv)
    print(json.dumps(train_run(args.root, args.seed, args.fold, args.head, args.sd_loss_weight)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
