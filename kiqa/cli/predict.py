"""`kiqa predict`: score images through a TF Serving endpoint over gRPC."""

import argparse
import sys

from kiqa.cli._common import EXIT_OK, EXIT_PARTIAL, entry_point, print_model_warning
from kiqa.contract import (
    BYTES_SIGNATURE,
    CLIENT_BATCH_SIZE as DEFAULT_BATCH_SIZE,
    CLIENT_MAX_MESSAGE_BYTES,
    CLIENT_TIMEOUT as DEFAULT_TIMEOUT,
    DEFAULT_MODEL_NAME as DEFAULT_MODEL,
    DEFAULT_SERVER,
    IMAGE_EXTENSIONS,
)

# Failures listed on the terminal; the CSV (--out) has all of them.
SHOWN_FAILURES = 10
DEFAULT_MAX_MESSAGE_MB = CLIENT_MAX_MESSAGE_BYTES // 2**20


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa predict",
        description="Send image files to a kiqa model served by TF Serving (gRPC) and print "
        "their MOS (KonIQ's 0-100 scale, higher is better) as CSV: path,mos,error. The "
        "server decodes and resizes the images itself. Files the server rejects (not an "
        "image, over the pixel cap) get an error row and the rest are scored (exit code 3).",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help=f"image files and folders (searched recursively for {' '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"TF Serving's gRPC host:port (default {DEFAULT_SERVER}; 8501 is REST, not gRPC)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name in models.config (default {DEFAULT_MODEL})")
    parser.add_argument("--version", type=int, default=None,
                        help="a specific version (default: the latest available)")
    parser.add_argument("--signature", default=None, help=f"signature name (default {BYTES_SIGNATURE})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per request (default {DEFAULT_BATCH_SIZE}; keep it at or below the "
                        "server's max_batch_size)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"this client's gRPC message limit in MB (default {DEFAULT_MAX_MESSAGE_MB}; "
                        "gRPC's own default of 4 MB is less than one large JPEG)")
    parser.add_argument("--status", action="store_true",
                        help="print the model's versions, their states and the signature, then exit")
    parser.add_argument("--out", help="write the CSV here instead of standard output")
    parser.add_argument("--maps", metavar="DIR",
                        help="also write a quality map per image into DIR (NAME.map.png, .map.npy, "
                        ".map.json, as kiqa map writes them) from the export's quality_map signature; "
                        "one request per image, and the CSV's scores come from the same requests")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out CSV written by another served model (or version), and "
                        "with --maps, maps of the same name from an earlier run")
    return parser


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa predict`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.paths and not args.status:
        parser.error("give image files or folders to score, or --status")
    from kiqa.provenance import write_sidecar
    from kiqa.scoring.files import find_images
    from kiqa.scoring.table import check_output
    from kiqa.serving.client import ScoreResult, ServingClient

    client = ServingClient(
        args.server,
        model_name=args.model,
        version=args.version,
        signature_name=args.signature or BYTES_SIGNATURE,
        timeout=args.timeout,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )
    with client:
        if args.status:
            return _print_status(client)
        found = find_images(args.paths)
        if args.out:
            # Before any request: --out must not be an input image or a file kiqa did not write.
            check_output(args.out, found, replace=True)
        served = client.check()
        record = client.provenance()
        source, identity = f"{args.server}/{args.model}", {"served_version": served["version"]}
        if args.out and not args.overwrite:
            _refuse_another_model(args.out, source, record, identity)
        readable = [path for path, error in found if error is None]
        scored = iter(_map_files(client, readable, args, record) if args.maps
                      else client.score_files(readable, batch_size=args.batch_size))
        results = [
            next(scored) if error is None else ScoreResult(str(path), error=f"{path}: {error}")
            for path, error in found
        ]
    _write_csv(results, args.out)
    if args.out:
        write_sidecar(args.out, record, source, **identity)
    failures = [r for r in results if not r.ok]
    print(f"{len(results)} files: {len(results) - len(failures)} scored, {len(failures)} failed", file=sys.stderr)
    for result in failures[:SHOWN_FAILURES]:
        # A name that is not valid UTF-8 is shown escaped (the CSV keeps its bytes).
        print(f"  {result.error}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    if len(failures) > SHOWN_FAILURES:
        print(f"  ... and {len(failures) - SHOWN_FAILURES} more", file=sys.stderr)
    if any(r.too_large for r in failures):
        print("  files over the message limit were not sent: raise --max-message-mb", file=sys.stderr)
    print_model_warning(record)
    return EXIT_PARTIAL if failures else EXIT_OK


def _refuse_another_model(out, source, record, identity):
    """An existing --out CSV is replaced only with the same served model's scores: the
    same address and name, version and provenance record as its sidecar names.

    Raises:
        ScoresFromAnotherModelError: its sidecar names another model, or it has none
            (kiqa cannot tell which model wrote it).
    """
    from pathlib import Path

    from kiqa.errors import ScoresFromAnotherModelError
    from kiqa.provenance import read_sidecar, report_entry

    out = Path(out)
    if not out.is_file() or out.stat().st_size == 0:
        return
    previous = read_sidecar(out)
    current = report_entry(record, source, **identity)
    keys = ("source", "served_version", "provenance")
    if previous is not None and all(previous.get(key) == current[key] for key in keys):
        return
    named = (f"{previous.get('source')} version {previous.get('served_version', '?')}" if previous
             else "a model it does not record (no readable provenance sidecar)")
    raise ScoresFromAnotherModelError(
        f"{out} holds scores from {named}, not from {source} version {identity['served_version']}; "
        f"it is left untouched",
        folder=str(out.parent), previous=previous, current=current, path=str(out),
    )


def _map_files(client, paths, args, record):
    """`--maps`: maps through the quality_map signature, as `ScoreResult`s for the CSV."""
    from kiqa.map_report import served_maps
    from kiqa.serving.client import ScoreResult

    results = served_maps(client, paths, args.maps, record, overwrite=args.overwrite)
    if any(r.error and "earlier run" in r.error for r in results):
        print(f"maps of the same name exist in {args.maps}: pass --overwrite to replace them", file=sys.stderr)
    return [ScoreResult(r.path, error=r.error) if r.error else ScoreResult(r.path, mos=r.summary["mos"])
            for r in results]


def _print_status(client):
    info = client.check()
    print(f"model {client.model_name!r} at {client.server}:")
    for status in info["versions"]:
        error = f" ({status.error_message})" if status.error_message else ""
        print(f"  version {status.version}: {status.state}{error}")
    signature = info["signature"]
    print(f"requests go to version {info['version']}, signature {client.signature_name!r}:")
    for kind in ("inputs", "outputs"):
        for key, (dtype, shape) in signature[kind].items():
            print(f"  {kind[:-1]} {key}: {dtype}{shape}")
    record = client.provenance()
    print(f"provenance: {record.describe() if record is not None else 'unknown (no record in this export)'}")
    print_model_warning(record)
    return EXIT_OK


def _write_csv(results, out):
    """path,mos,error rows, with `kiqa score`'s encoding rule: UTF-8, and file names that
    are not valid UTF-8 written back as their original bytes (surrogateescape), so every
    path round-trips (`os.fsencode` of the field read back with the same rule)."""
    from kiqa.fsutil import CSV_TEXT as CSV_OPEN_OPTIONS, CsvWriter, writing
    from kiqa.contract import CSV_COLUMNS, DISTRIBUTION_CSV_COLUMNS
    from kiqa.scoring.table import csv_row

    if out:
        with writing(out):
            handle = open(out, "w", **CSV_OPEN_OPTIONS)
    else:
        handle = sys.stdout
        if hasattr(handle, "reconfigure"):
            handle.reconfigure(errors="surrogateescape")
    with writing(out or "<standard output>"):
        try:
            writer = CsvWriter(handle)
            # A distribution model's export answers mos_sd and p1..p5 too: `kiqa score`'s columns.
            distribution = any(result.mos_sd is not None for result in results)
            writer.writerow(DISTRIBUTION_CSV_COLUMNS if distribution else CSV_COLUMNS)
            for result in results:
                extras = None
                if distribution:
                    extras = [result.mos_sd, *result.shares] if result.mos_sd is not None else []
                writer.writerow(csv_row(result.name, result.mos, result.error, extras))
        finally:
            if out:
                handle.close()


if __name__ == "__main__":
    sys.exit(main())
