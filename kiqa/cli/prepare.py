"""`kiqa prepare`: decode and resize a KonIQ-format set once into TFRecord shards.

Training then reads 8-bit pixels instead of decoding every JPEG again each epoch. The
default output folder, `<labels folder>/prepared-<H>x<W>/`, is where training looks for
it, so a prepared set is used without further flags when its image size matches.
"""

import argparse
import sys
import warnings
from pathlib import Path

from kiqa.cli._common import EXIT_OK, EXIT_PARTIAL, entry_point
from kiqa.config import TrainConfig
from kiqa.contract import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_PIXELS


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa prepare",
        description="Decode, orient and resize every image of a KonIQ-format label file once, with "
        "the same function training uses, into uint8 TFRecord shards plus a manifest. Exact: "
        "training reads back the very pixels it would have decoded. Costs HEIGHTxWIDTHx3 bytes per "
        "image on disk (590 KB at 384x512: 5.9 GB for KonIQ-10k). Unusable images are listed, "
        "not fatal (exit code 3).",
    )
    parser.add_argument("labels", metavar="LABELS.csv",
                        help="KonIQ label CSV (koniq10k_distributions_sets.csv, "
                        "koniq10k_scores_and_distributions.csv, or one in either layout)")
    parser.add_argument("--images", help="image folder the CSV's image_name values are relative to "
                        "(default: the CSV's folder, or its 1024x768/ or 512x384/ subfolder)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=DEFAULT_IMAGE_SIZE,
                        help="size every whole image is resized to, as in training (default 384 512)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject images whose header announces more pixels (default {DEFAULT_MAX_PIXELS}); "
                        "training must use the same value to use the prepared set")
    parser.add_argument("--out", help="output folder (default <labels folder>/prepared-HEIGHTxWIDTH, "
                        "where training finds it)")
    parser.add_argument("--shards", type=int, help="number of TFRecord shards (default: ~256 MB each)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa prepare`."""
    args = build_parser(prog).parse_args(argv)
    config = TrainConfig(labels=args.labels, images=args.images, image_size=tuple(args.image_size),
                         max_pixels=args.max_pixels)
    from kiqa.data.koniq import default_image_root, read_labels
    from kiqa.data.prepared import default_prepared_dir, open_prepared, prepare_dataset

    frame = read_labels(args.labels)
    root = Path(args.images) if args.images else default_image_root(args.labels)
    out = Path(args.out) if args.out else default_prepared_dir(args.labels, config.image_size)
    print(f"preparing {len(frame)} images from {root} at {config.image_size[0]}x{config.image_size[1]} "
          f"into {out}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.showwarning = _upscale_notice(warnings.showwarning, prog or "kiqa prepare")
        out = prepare_dataset(frame, root, config, out, shards=args.shards, progress=not args.quiet)
    prepared = open_prepared(out, config)
    rejects = prepared.rejects
    print(f"prepared {len(prepared.image_names)} images in {len(prepared.manifest['shards'])} shard(s): {out}")
    if len(rejects):
        print(f"{len(rejects)} image(s) could not be used (listed in {out / 'manifest.json'}):", file=sys.stderr)
        for row in rejects.head(20).itertuples():
            print(f"  {row.image_name}: {row.reason}", file=sys.stderr)
        if len(rejects) > 20:
            print(f"  ... and {len(rejects) - 20} more", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _upscale_notice(show, prog):
    """Prints an `UpscaleWarning` at once, with the flag that avoids it."""
    from kiqa.data.prepared import UpscaleWarning

    def notice(message, category, *rest, **kwargs):
        if not issubclass(category, UpscaleWarning):
            return show(message, category, *rest, **kwargs)
        (height, width), _ = max(message.sizes.items(), key=lambda kv: kv[1])
        print(f"{prog}: warning: {message}; to keep the sources' size, prepare and train with "
              f"--image-size {height} {width}", file=sys.stderr)
        return None

    return notice


if __name__ == "__main__":
    sys.exit(main())
