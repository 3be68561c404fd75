"""`kiqa compare`: compare folders of images (e.g. SR outputs) without references."""

import argparse
import sys

from kiqa.cli._common import add_model_arguments, EXIT_OK, EXIT_PARTIAL, entry_point, print_model_warning
from kiqa.cli.remedies import IGNORE_EXTENSION_HINT
from kiqa.cli.score import print_failures, scoring_options


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa compare",
        description="Score two or more folders holding the same images (e.g. the outputs of "
        "different restoration or super-resolution models; no reference needed), pair the "
        "images by relative path and compare their MOS (KonIQ-10k's 0-100 scale, higher is "
        "better): mean and median difference, how often each scores higher, a Wilcoxon "
        "signed-rank test and a bootstrap confidence interval. Writes per_image.csv, "
        "unpaired.csv, compare.json, compare.png (and ranking.csv for 3+ folders) to --out. "
        "Exit code 3 when some files could not be scored.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="two or more folders; differences are first minus second")
    add_model_arguments(parser)
    job = parser.add_argument_group("job")
    job.add_argument("--out", required=True,
                     help="output folder; its per-folder score CSVs are resumed when the command "
                     "is rerun (use a new folder for another model)")
    job.add_argument("--ignore-extension", action="store_true",
                     help="pair x.png with x.jpg (match relative paths without their extension)")
    job.add_argument("--batch-size", type=int, default=None, help="images per model call (default 16)")
    job.add_argument("--no-skip", action="store_true", help="rescore every file instead of resuming")
    job.add_argument("--max-mb", type=float, default=None,
                     help="refuse files larger than this many megabytes (default 200)")
    job.add_argument("--follow-links", action="store_true",
                     help="follow symbolic links that point outside the folders")
    job.add_argument("--quiet", action="store_true", help="no progress bars")
    job.add_argument("--maps", action="store_true",
                     help="also write, per paired image, where the first folder is better than the "
                     "second: the A - B quality map in MOS points (maps/A-vs-B/NAME.diff.png and "
                     ".diff.npy) and, in maps.json, the share of map cells where A is better")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    stats.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    stats.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return parser


def _format_pair(pair):
    p_value = pair["wilcoxon"]["p_value"]
    p_text = f"p = {p_value:.3g}" if p_value is not None else f"not run ({pair['wilcoxon']['note']})"
    return [
        f"{pair['a']} vs {pair['b']} ({pair['n']} images): "
        f"mean MOS {pair['mean_a']:.2f} vs {pair['mean_b']:.2f}",
        f"  mean difference {pair['mean_diff']:+.2f} "
        f"({pair['ci_level']:.0%} CI {pair['ci_low']:+.2f} to {pair['ci_high']:+.2f}), "
        f"median {pair['median_diff']:+.2f}",
        f"  {pair['a']} higher on {pair['a_better_fraction']:.0%} of images, {pair['b']} on "
        f"{pair['b_better_fraction']:.0%}, ties {pair['tie_fraction']:.0%}",
        f"  Wilcoxon signed-rank (two-sided): {p_text}",
        f"  in context: {pair['context']['text']}" if pair.get("context") else "",
    ] + _format_spread(pair)


def _format_spread(pair):
    """The pair's differences against the predicted rater spread (distribution models only)."""
    spread = pair.get("spread")
    if not spread or spread["mean_spread"] is None:
        return []
    return [
        f"  against the predicted spread of people's ratings (mean {spread['mean_spread']:.2f} points): mean "
        f"difference {spread['mean_diff_in_spreads']:+.2f} spreads; |difference| beyond the spread on "
        f"{spread['beyond_spread_fraction']:.0%} of images (raters would disagree about the rest)"
    ]


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa compare`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if len(args.dirs) < 2:
        parser.error("give at least two folders to compare")
    from kiqa.scoring.compare import compare_folders
    from kiqa.scoring.scorer import load_scorer

    # A typed error's flags to fix it are in kiqa.cli.remedies (printed by entry_point).
    scorer = load_scorer(args.model, image_size=args.image_size, safe_mode=not args.unsafe)
    result = compare_folders(
        args.dirs, scorer, args.out, ignore_extension=args.ignore_extension,
        n_resamples=args.bootstrap, confidence=args.confidence, seed=args.seed,
        **scoring_options(args),
    )
    print(f"{result.n_common} images scored in all {len(result.folders)} folders; "
          f"{result.n_unpaired} unpaired, {result.n_failed} failed (see {result.files['unpaired']})")
    if result.extension_pairable:
        label, path = result.extension_pairable[0]
        print(f"{len(result.extension_pairable)} unpaired image(s) differ only by their extension "
              f"(e.g. {label}: {path}); {IGNORE_EXTENSION_HINT}", file=sys.stderr)
    if result.ranking is None:
        print("\n".join(filter(None, _format_pair(result.pairs[0]))))
    else:
        print("rank  mean MOS  median  mean win rate  folder")
        for row in result.ranking:
            print(f"{row['rank']:>4}  {row['mean_mos']:8.2f}  {row['median_mos']:6.2f}  "
                  f"{row['mean_win_rate']:13.2f}  {row['label']} ({row['folder']})")
    print(f"written to {result.out_dir}: per_image.csv, compare.json, compare.png"
          + (", ranking.csv" if result.ranking is not None else ""))
    if args.maps:
        _write_maps(scorer, result, args)
    print_model_warning(scorer.provenance)
    if result.n_failed:
        failures = [item for summary in result.summaries for item in summary.failures]
        print(f"{result.n_failed} file(s) could not be scored:", file=sys.stderr)
        print_failures(failures, result.out_dir)
        return EXIT_PARTIAL
    return EXIT_OK


def _write_maps(scorer, result, args):
    """`--maps`: the A - B maps of the paired images and the share of cells A wins."""
    import pandas as pd

    from kiqa.map_report import compare_maps

    keys = pd.read_csv(result.files["per_image"], keep_default_na=False)["path"].tolist()
    summary = compare_maps(scorer, result.folders, result.labels, keys, result.out_dir,
                           ignore_extension=args.ignore_extension)
    for pair in summary["pairs"]:
        if pair["cells"]:
            print(f"maps: {pair['a']} better on {pair['a_better_share']:.0%} of map cells, {pair['b']} on "
                  f"{pair['b_better_share']:.0%} ({pair['n_images']} images, {pair['cells']} cells)")
        if pair["errors"]:
            print(f"maps: {len(pair['errors'])} paired image(s) could not be mapped (see maps.json)", file=sys.stderr)
    print(f"difference maps written to {result.out_dir}/maps/, summary in {result.out_dir}/maps.json")


if __name__ == "__main__":
    sys.exit(main())
