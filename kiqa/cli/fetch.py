"""`kiqa fetch-koniq`: download, verify and extract KonIQ-10k into a folder."""

import argparse
import logging
import sys

from kiqa.cli._common import EXIT_OK, entry_point
from kiqa.errors import ConfigError


def build_parser(prog=None):
    """The argument parser."""
    from kiqa.data.fetch import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, OFFICIAL_BASE_URL, SMALL_ARCHIVES, SPLIT_FILE_URL, describe_downloads

    parser = argparse.ArgumentParser(
        prog=prog or "kiqa fetch-koniq",
        description="Download KonIQ-10k (10,073 photos rated on a 0-100 MOS scale) from its official "
        "site, resuming interrupted downloads, check each archive's size and sha256, extract it "
        "safely, fetch the official split file, and check that every labelled image is there. "
        "A rerun after success downloads nothing. Archives already in DIR (e.g. downloaded with a "
        "browser) are used instead of downloaded.",
    )
    parser.add_argument("dir", metavar="DIR", help=f"folder to fetch into: {describe_downloads()} "
                        "(the archives are kept beside the extracted images)")
    parser.add_argument("--base-url", default=OFFICIAL_BASE_URL,
                        help=f"where the archives are, e.g. a mirror (default {OFFICIAL_BASE_URL})")
    parser.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                        help="expected sha256 of an archive, e.g. koniq10k_1024x768.zip=<64 hex digits>; "
                        "repeatable. The KonIQ site publishes none, so by default the digest is only recorded")
    parser.add_argument("--small", action="store_true",
                        help=f"fetch the 512x384 copy of the images instead of 1024x768: "
                        f"{describe_downloads(SMALL_ARCHIVES)}")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--split-file-url", default=SPLIT_FILE_URL,
                       help="official split file (training/validation/test 7058/1000/2015; "
                       f"default {SPLIT_FILE_URL})")
    split.add_argument("--no-split-file", action="store_true",
                       help="skip the official split file (random splits still work)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds allowed for each connect or read (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--deadline-hours", type=float, default=DEFAULT_DEADLINE / 3600,
                        help=f"hours allowed for each file's whole download, retries included (default "
                        f"{DEFAULT_DEADLINE / 3600:g}; a rerun resumes after the bytes received)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_checksums(values):
    """`["NAME=HEX", ...]` -> {NAME: {"sha256": HEX}}; raises ConfigError on a bad entry."""
    expected = {}
    for value in values:
        name, sep, digest = value.partition("=")
        if not sep or not name or not digest:
            raise ConfigError(f"--sha256 takes NAME=HEX, e.g. koniq10k_1024x768.zip=<64 hex digits>; got {value!r}")
        expected[name.strip()] = {"sha256": digest.strip()}
    return expected


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa fetch-koniq`."""
    args = build_parser(prog).parse_args(argv)
    from kiqa.data.fetch import DEFAULT_ARCHIVES, SMALL_ARCHIVES, SPLIT_FILE, fetch_koniq

    archives = SMALL_ARCHIVES if args.small else DEFAULT_ARCHIVES
    expected = parse_checksums(args.sha256)
    unknown = sorted(set(expected) - set(archives) - {SPLIT_FILE})
    if unknown:
        raise ConfigError(f"--sha256 names {unknown}, which this fetch does not download; "
                          f"names are {sorted([*archives, SPLIT_FILE])}")
    _log_to_stderr(prog or "kiqa fetch-koniq")
    labels = fetch_koniq(
        args.dir, base_url=args.base_url, archives=archives, expected=expected,
        progress=not args.quiet, split_file_url=None if args.no_split_file else args.split_file_url,
        timeout=args.timeout, deadline=args.deadline_hours * 3600,
    )
    print(f"KonIQ-10k is ready: {labels}")
    for name, digest in _unpinned_digests(args.dir, archives, expected).items():
        print(f"{name} has no published sha256; to check it on later fetches, pass --sha256 {name}={digest}",
              file=sys.stderr)
    print(f"train with: kiqa train --labels {labels}")
    return EXIT_OK


def _unpinned_digests(out_dir, archives, given):
    """{archive: the sha256 recorded by this fetch} for the archives nothing pinned."""
    import json
    from pathlib import Path

    from kiqa.data.fetch import EXPECTED, STATE_FILE

    try:
        files = json.loads((Path(out_dir) / STATE_FILE).read_text()).get("files", {})
    except (OSError, ValueError):
        return {}  # the fetch itself logged its digests; the state file is only a convenience here
    return {name: files[name]["sha256"] for name in archives
            if name in files and "sha256" in files[name] and name not in given and EXPECTED[name].sha256 is None}


def _log_to_stderr(prog):
    """The library logs what it did (checksums, resumes, warnings); show it to the user."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    logger = logging.getLogger("kiqa.data.fetch")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
