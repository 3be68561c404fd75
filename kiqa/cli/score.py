"""`kiqa score`: score files and folders of images with a local model into a CSV."""

import argparse
import sys

from kiqa.cli._common import add_model_arguments, EXIT_OK, EXIT_PARTIAL, entry_point, print_model_warning
from kiqa.provenance import sidecar_path
from kiqa.contract import DEFAULT_MAX_BYTES

# Failures listed on the terminal; the CSV has all of them.
SHOWN_FAILURES = 10


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa score",
        description="Predict the quality of images without a reference: MOS on KonIQ-10k's "
        "0-100 scale, higher is better. Writes one CSV row per file (path, mos, error); "
        "files that cannot be used get a row with the reason and the job goes on "
        "(exit code 3 when some failed). Rows are written as they come: rerunning the same "
        "command after an interruption skips the files already in the CSV.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files and folders (folders are searched recursively for "
                        ".jpg .jpeg .png .bmp .gif .webp, any case)")
    add_model_arguments(parser)
    parser.add_argument("--engine", choices=("tf", "onnxruntime", "openvino", "openvino-bf16"), default="tf",
                        help="what runs the model: tf (default), onnxruntime or openvino (float32; "
                        "need kiqa[onnx] / kiqa[openvino]; --model is then an ONNX export from "
                        "kiqa export --format onnx, or a run / .keras file converted at start-up, "
                        "which takes tens of seconds), or openvino-bf16: bfloat16, ~1.9x openvino "
                        "on CPUs with AVX512_BF16 or AMX, checked at start-up against float32 on "
                        "the first 16 of your images and refused if any score moves more than "
                        "0.5 MOS or the ranking changes (SRCC < 0.999)")
    job = parser.add_argument_group("job")
    job.add_argument("--out", default="scores.csv", help="CSV to write or resume (default scores.csv)")
    job.add_argument("--batch-size", type=int, default=None,
                     help="images per model call (default 16; lower it if memory is short)")
    job.add_argument("--no-skip", action="store_true",
                     help="replace --out and rescore every file, instead of skipping files already in it")
    job.add_argument("--max-mb", type=float, default=None,
                     help="refuse files larger than this many megabytes (default 200)")
    job.add_argument("--follow-links", action="store_true",
                     help="follow symbolic links that point outside the given paths (default: "
                     "such links get an error row)")
    job.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def scoring_options(args):
    """Keyword arguments for `score_paths` / `compare_folders` from parsed flags."""
    from kiqa.scoring.batches import DEFAULT_BATCH_SIZE

    return dict(
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        skip_existing=not args.no_skip,
        progress=not args.quiet,
        max_bytes=int(args.max_mb * 1024 * 1024) if args.max_mb else DEFAULT_MAX_BYTES,
        follow_links_outside=args.follow_links,
    )


def _parity_sample(args):
    """The user's own images a reduced-precision engine is checked on: the first ones found."""
    from kiqa.scoring.scorer import PARITY_SAMPLE
    from kiqa.serving.engines import REDUCED_PRECISION

    if args.engine not in REDUCED_PRECISION:
        return None
    from kiqa.scoring.files import find_images

    found = find_images(args.paths, follow_links_outside=args.follow_links)
    return [path for path, error in found if error is None][: 2 * PARITY_SAMPLE]


def print_precision_parity(scorer):
    """One line on how far a reduced-precision engine is from float32 (nothing for float32)."""
    figures = scorer.precision_parity
    if figures is None:
        return
    srcc = "n/a" if figures["srcc"] is None else f"{figures['srcc']:.4f}"
    print(f"{scorer.engine} ({figures['precision']}): vs float32 on {figures['images']} images "
          f"({figures['caller_images']} of yours): max |dMOS| {figures['max_abs_diff']:.3f} "
          f"(bound {figures['tolerance']}), mean {figures['mean_abs_diff']:.3f}, SRCC {srcc}")
    spread = figures.get("mos_sd")  # a distribution model's predicted spread, same bound
    if spread:
        print(f"{scorer.engine}: mos_sd vs float32: max |d| {spread['max_abs_diff']:.3f} points "
              f"(bound {spread['tolerance']}), mean {spread['mean_abs_diff']:.3f}")
    if figures.get("note"):
        print(f"{scorer.engine}: {figures['note']}")


def print_failures(failures, where):
    """Lists the first failed files on stderr (names that are not UTF-8 as \\xNN escapes)."""
    from kiqa.fsutil import printable

    for path, error in failures[:SHOWN_FAILURES]:
        print(f"  {printable(path)}: {printable(error)}", file=sys.stderr)
    if len(failures) > SHOWN_FAILURES:
        print(f"  ... and {len(failures) - SHOWN_FAILURES} more (see {where})", file=sys.stderr)


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa score`."""
    args = build_parser(prog).parse_args(argv)
    from kiqa.scoring.scorer import load_scorer
    from kiqa.scoring.files import is_link_outside
    from kiqa.scoring.table import score_paths

    scorer = load_scorer(args.model, image_size=args.image_size, safe_mode=not args.unsafe,
                         engine=args.engine, parity_images=_parity_sample(args))
    print_precision_parity(scorer)
    summary = score_paths(args.paths, scorer, args.out, **scoring_options(args))
    resumed = f" ({summary.n_skipped} from an earlier run)" if summary.n_skipped else ""
    print(f"{summary.n_files} files{resumed}: {summary.n_scored} scored, {summary.n_failed} failed")
    if summary.n_scored:
        print(
            f"MOS (0-100, higher is better): mean {summary.mean_mos:.2f}, "
            f"median {summary.median_mos:.2f}"
        )
    from kiqa.fsutil import printable

    print(f"scores written to {printable(summary.out_csv)} "
          f"(the model's provenance: {printable(sidecar_path(summary.out_csv))})")
    print_model_warning(scorer.provenance)
    if summary.n_failed:
        print(f"{summary.n_failed} file(s) could not be scored:", file=sys.stderr)
        print_failures(summary.failures, summary.out_csv)
        links = sum(is_link_outside(error) for _, error in summary.failures)
        if links:
            print(f"{prog}: note: {links} symbolic link(s) point outside the given paths and were "
                  f"not followed; pass --follow-links to score their targets", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
