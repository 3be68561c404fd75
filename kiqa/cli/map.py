"""`kiqa map`: where the damage is. Writes a quality map per image (PNG, .npy, JSON)."""

import argparse
import sys

from kiqa.cli._common import add_model_arguments, EXIT_OK, EXIT_PARTIAL, entry_point, print_model_warning
from kiqa.cli.score import print_failures
from kiqa.contract import DEFAULT_MAX_BYTES


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa map",
        description="Map local quality without a reference: the model's head run on every cell "
        "of the backbone's last feature map, in MOS points on KonIQ-10k's 0-100 scale (higher is "
        "better); the map's mean is the image's score. Writes per image NAME.map.png (the photo "
        "with the map over it and a colour bar), NAME.map.npy (the map, float32 rows x cols) and "
        "NAME.map.json (score, grid, cell size, worst and best regions, the model). A file that "
        "cannot be used is reported and the job goes on (exit code 3).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files and folders (searched recursively like kiqa score)")
    add_model_arguments(parser)
    job = parser.add_argument_group("job")
    job.add_argument("--out", required=True, help="output folder (created)")
    job.add_argument("--overwrite", action="store_true",
                     help="replace maps of the same name from an earlier run (default: keep them "
                     "and report the image as not mapped)")
    job.add_argument("--max-mb", type=float, default=None,
                     help="refuse files larger than this many megabytes (default 200)")
    return parser


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa map`."""
    args = build_parser(prog).parse_args(argv)
    from kiqa.map_report import write_maps
    from kiqa.scoring.scorer import load_scorer

    max_bytes = int(args.max_mb * 1024 * 1024) if args.max_mb else DEFAULT_MAX_BYTES
    # A typed error's flags to fix it are in kiqa.cli.remedies (printed by entry_point).
    scorer = load_scorer(args.model, image_size=args.image_size, safe_mode=not args.unsafe)
    results = write_maps(scorer, args.images, args.out, overwrite=args.overwrite, max_bytes=max_bytes)
    failures = [(r.path, r.error) for r in results if r.error]
    done = [r for r in results if not r.error]
    for result in done:
        summary = result.summary
        worst = summary["worst_regions"][0]
        print(f"{result.path}: MOS {summary['mos']:.2f}, map {summary['grid'][0]}x{summary['grid'][1]}, "
              f"worst cell {worst['mos']:.2f} at row {worst['row']} col {worst['col']} -> {result.files[0]}")
    print(f"{len(results)} images: {len(done)} mapped, {len(failures)} failed; written to {args.out}")
    print_model_warning(scorer.provenance)
    if failures:
        print(f"{len(failures)} file(s) could not be mapped:", file=sys.stderr)
        print_failures(failures, args.out)
        if any("earlier run" in error for _, error in failures):
            print(f"{prog or 'kiqa map'}: pass --overwrite to replace earlier maps", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
