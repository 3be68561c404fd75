"""`kiqa score-beam` / `python -m kiqa.beam`: `kiqa score` as an Apache Beam pipeline.

kiqa's own flags are parsed here; every other flag (`--runner`, `--project`,
`--region`, `--temp_location`, `--direct_num_workers`, ...) goes to Beam's
`PipelineOptions` untouched, as Beam pipelines expect.
"""

import argparse
import sys

from kiqa.cli._common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, add_model_arguments, entry_point

FORMATS = ("csv", "parquet")  # kiqa.beam.pipeline.FORMATS (not imported: --help must not load Beam)


def build_parser(prog=None):
    """The argument parser of kiqa's own flags."""
    # allow_abbrev=False: a Beam option must never be taken for a prefix of a kiqa flag.
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa score-beam", allow_abbrev=False,
        description="Score images with a local model on Apache Beam (DirectRunner, Dataflow, "
        "Flink, Spark): MOS on KonIQ-10k's 0-100 scale, higher is better. Writes sharded "
        "CSV and Parquet (path, mos, error; the rows `kiqa score` writes, so a distribution "
        "model's also hold mos_sd and p1..p5) and PREFIX-summary.json (counts, the columns, the "
        "model used). Files that cannot be used get a row "
        "with the reason (exit code 3). Every flag not listed here is a Beam pipeline option "
        "(--runner, --project, --region, --temp_location, --direct_num_workers, ...).",
    )
    inputs = parser.add_argument_group("inputs (any Beam file system: local, gs://, s3://, hdfs://)")
    inputs.add_argument("--input", action="append", default=[], metavar="PATTERN",
                        help="a file, a folder (searched recursively for .jpg .jpeg .png .bmp "
                        ".gif .webp and TIFF, any case) or a pattern such as 'gs://b/photos/**.jpg'; "
                        "repeatable")
    inputs.add_argument("--input-list", action="append", default=[], metavar="FILE",
                        help="a text file with one path a line, or a CSV with a 'path' column; "
                        "repeatable")
    model = add_model_arguments(parser)
    model.add_argument(
        "--large-model", action="store_true",
        help="load one model copy per machine and share it between worker processes "
        "(for a GPU with room for one copy); default one copy per process")
    model.add_argument(
        "--engine", choices=("tf", "onnxruntime", "openvino", "openvino-bf16"), default="tf",
        help="what runs the model (as for kiqa score); openvino-bf16 is checked against float32 "
        "on generated images by the launcher and every worker, and refused over 0.5 MOS or "
        "SRCC < 0.999; its figures go in PREFIX-summary.json")
    job = parser.add_argument_group("job")
    job.add_argument("--output", required=True, metavar="PREFIX",
                     help="output prefix: PREFIX-00000-of-0000N.csv/.parquet and PREFIX-summary.json")
    job.add_argument("--overwrite", action="store_true",
                     help="replace the outputs of an earlier run at --output (default: refuse)")
    job.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                     help="output formats (default: csv parquet)")
    job.add_argument("--num-shards", type=int, default=0,
                     help="output files per format (default 0: the runner decides)")
    job.add_argument("--batch-size", type=int, default=None,
                     help="images per model call (default 16, the largest a call takes)")
    job.add_argument("--max-mb", type=float, default=None,
                     help="refuse files larger than this many megabytes (default 200)")
    return parser


@entry_point
def main(argv=None, prog=None):
    """Runs the pipeline to the end; 0 when every file scored, 3 when some failed."""
    args, pipeline_args = build_parser(prog).parse_known_args(argv)
    if not args.input and not args.input_list:
        print(f"{prog or 'kiqa score-beam'}: error: give --input PATTERN and/or --input-list FILE",
              file=sys.stderr)
        return EXIT_ERROR
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        print(f"{prog or 'kiqa score-beam'}: error: Apache Beam is not installed; "
              f"pip install 'kiqa[beam]'", file=sys.stderr)
        return EXIT_ERROR
    from kiqa.beam.pipeline import BeamScoreJob, score_with_beam
    from kiqa.contract import DEFAULT_MAX_BYTES

    job = BeamScoreJob(
        inputs=tuple(args.input), input_lists=tuple(args.input_list), model=args.model,
        output=args.output, formats=tuple(args.formats), image_size=args.image_size,
        safe_mode=not args.unsafe, batch_size=args.batch_size,
        max_bytes=int(args.max_mb * 1024 * 1024) if args.max_mb else DEFAULT_MAX_BYTES,
        overwrite=args.overwrite, num_shards=args.num_shards, large_model=args.large_model,
        engine=args.engine,
    )
    summary = score_with_beam(job, PipelineOptions(pipeline_args))
    print(f"{summary['n_files']} files: {summary['n_scored']} scored, {summary['n_failed']} failed")
    if summary["mean_mos"] is not None:
        print(f"mean MOS (0-100, higher is better): {summary['mean_mos']:.2f}")
    print(f"scores written to {args.output}-*; summary in {args.output}-summary.json")
    if summary["n_files"] == 0:
        print("no image files were found in the inputs", file=sys.stderr)
        return EXIT_ERROR
    if summary["n_failed"]:
        print(f"{summary['n_failed']} file(s) could not be scored: see the error column", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
