"""`kiqa score` as an Apache Beam pipeline: the same rows, on any Beam runner.

    paths (file patterns, folders, lists of paths)
      -> Distinct (each file once, spread over workers)
      -> DecodeImages (kiqa.scoring.batches.load_pixels: kiqa's one image function, its error text)
      -> RunInference(KiqaModelHandler)                 bad files skip this step
      -> rows (path, mos, error) -> sharded CSV, Parquet, and a summary JSON

A distribution model's rows (`TrainConfig.head` "distribution") also hold `mos_sd` and
the shares `p1` .. `p5`: the CSV shards have `kiqa score`'s header for that model
(`DISTRIBUTION_CSV_COLUMNS`, byte for byte), the Parquet schema the same columns, and
the summary names the columns it wrote. A regression model's rows are (path, mos, error).

A file that cannot be read or decoded becomes a row with the error `kiqa score`
writes for it; it never fails a bundle, so a runner's retries only ever repeat work
that can succeed. Every step is a pure map of a file to its row, so a retried bundle
writes the same rows again (Beam's file sinks keep one attempt's output).

What differs from `kiqa score`: rows come in no particular order (each shard is
unordered), there is no resume (a rerun into the same output is refused, or replaces
it when allowed), and symbolic links are read wherever they point (file systems other
than the local one have none, so kiqa score's link check does not apply).
"""

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from kiqa.beam.handler import KiqaModelHandler, is_remote, local_copy
from kiqa.errors import DataError, ImageError
from kiqa.contract import (CSV_COLUMNS, DEFAULT_MAX_BYTES, DISTRIBUTION_COLUMNS, DISTRIBUTION_CSV_COLUMNS,
                           ERROR_COLUMN, IMAGE_EXTENSIONS, MOS_COLUMN, PATH_COLUMN)
from kiqa.fsutil import csv_value
from kiqa.image import read_image_bytes
from kiqa.scoring.batches import image_decoder, load_pixels, model_score
from kiqa.scoring.files import LISTED_UNSUPPORTED_EXTENSIONS
from kiqa.scoring.table import csv_columns, csv_row, encode_csv_line

FORMATS = ("csv", "parquet")
SUMMARY_SUFFIX = "-summary.json"
# Beam's default shard names: PREFIX-00000-of-00004.csv.
_SHARD_GLOB = "-[0-9]*-of-[0-9]*"
_WILDCARDS = ("*", "?", "[")
_FAILED = "failed"
# Paths and error texts travel through the pipeline as bytes: Linux file names need not
# be UTF-8, and Beam's coders (even sampling element sizes inside a fused stage) refuse
# the surrogates Python uses for such names in a str.
_PATH_ENCODING = ("utf-8", "surrogateescape")


def _bytes(text):
    return text.encode(*_PATH_ENCODING)


def _text(data):
    return data.decode(*_PATH_ENCODING)


@dataclasses.dataclass(frozen=True)
class BeamScoreJob:
    """What to score and where to write it.

    Attributes:
        inputs: file patterns or folders on any Beam file system (folders and
            wildcard patterns keep image files only, like `kiqa score` in a folder;
            a single file is taken whatever its name).
        input_lists: text files with one path a line, or CSVs with a `path` column.
        model: what `kiqa.load_scorer` takes, on any Beam file system.
        output: output prefix: PREFIX-SSSSS-of-NNNNN.csv / .parquet and PREFIX-summary.json.
        formats: any of `FORMATS`.
        image_size: (height, width), or None for the model's own.
        safe_mode: refuse `.keras` files with Lambda layers.
        batch_size: images per model call (None: the handler's limit).
        max_bytes: files larger than this get an error row.
        overwrite: replace the outputs of an earlier run at `output`.
        num_shards: output shards per format (0: the runner decides).
        large_model: one model copy per machine instead of per worker process.
        engine: what runs the model (`kiqa.scoring.scorer.ENGINES`). A reduced-precision one
            ("openvino-bf16") is gated against float32 on the launcher, and again on
            each worker (its CPU may differ); the launcher's figures go in the summary.
    """

    inputs: Tuple[str, ...] = ()
    input_lists: Tuple[str, ...] = ()
    model: str = ""
    output: str = ""
    formats: Tuple[str, ...] = FORMATS
    image_size: Optional[Tuple[int, int]] = None
    safe_mode: bool = True
    batch_size: Optional[int] = None
    max_bytes: int = DEFAULT_MAX_BYTES
    overwrite: bool = False
    num_shards: int = 0
    large_model: bool = False
    engine: str = "tf"


def _listed(path):
    """The names `kiqa score` lists in a folder: image extensions and TIFF (an error row)."""
    return path.lower().endswith(IMAGE_EXTENSIONS + LISTED_UNSUPPORTED_EXTENSIONS)


def _normalise(path):
    # kiqa score writes local paths normalised; a URL is left alone (normpath breaks gs://).
    return path if "://" in path else os.path.normpath(path)


def plan_input(pattern):
    """(pattern to match, keep image files only) for one input, checked on the launcher.

    A literal path that is a file is matched as it is; a folder becomes `folder/**`.

    Raises:
        DataError: the pattern or folder matches nothing.
    """
    pattern = str(pattern)
    if not any(char in pattern for char in _WILDCARDS):
        exact = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        inside = FileSystems.match([pattern.rstrip("/") + "/**"], limits=[1])[0].metadata_list
        if exact and not inside:
            return pattern, False
        pattern = pattern.rstrip("/") + "/**"
    if not FileSystems.match([pattern], limits=[1])[0].metadata_list:
        raise DataError(f"{pattern} matches no files; check the path or pattern")
    return pattern, True  # a folder or a wildcard: image files only, as kiqa score lists a folder


def read_list_header(list_file):
    """The column of `path` in a CSV list of paths, or None for one path a line.

    Raises:
        DataError: the list cannot be read.
    """
    try:
        with FileSystems.open(list_file, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            first = _text(handle.readline()).rstrip("\r\n")
    except (OSError, IOError) as err:
        raise DataError(f"cannot read the list of paths {list_file}: {err}") from err
    cells = next(csv.reader([first]), [])
    return cells.index(PATH_COLUMN) if PATH_COLUMN in cells else None


def _list_entry(line, column):
    text = _text(line).rstrip("\r\n")
    if column is not None:
        cells = next(csv.reader([text]), [])
        text = csv_value(cells[column]) if column < len(cells) else ""
    text = text.strip()
    return [_bytes(_normalise(text))] if text else []


def _matched_paths(metadata, images_only):
    path = metadata.path
    return [_bytes(_normalise(path))] if not images_only or _listed(path) else []


class ListImages(beam.PTransform):
    """The paths to score (bytes, UTF-8 with surrogateescape), each exactly once."""

    def __init__(self, inputs=(), input_lists=()):
        """Checks every input on the launcher, so a typo fails before any worker starts.

        Raises:
            DataError: an input matches nothing, or a list cannot be read.
        """
        super().__init__()
        self._patterns = [plan_input(pattern) for pattern in inputs]
        self._lists = [(name, read_list_header(name)) for name in input_lists]
        if not self._patterns and not self._lists:
            raise DataError("no input given: pass file patterns, folders or a list of paths")

    def expand(self, root):
        parts = []
        for index, (pattern, images_only) in enumerate(self._patterns):
            parts.append(
                root
                | f"Pattern{index}" >> beam.Create([pattern])
                # DISALLOW: a pattern emptied between the launcher's check and the run fails loudly.
                | f"Match{index}" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
                | f"Keep{index}" >> beam.FlatMap(_matched_paths, images_only)
            )
        for index, (name, column) in enumerate(self._lists):
            parts.append(
                root
                | f"List{index}" >> beam.io.ReadFromText(
                    name, skip_header_lines=0 if column is None else 1,
                    coder=beam.coders.BytesCoder())
                | f"Entries{index}" >> beam.FlatMap(_list_entry, column)
            )
        return parts | "AllPaths" >> beam.Flatten() | "Once" >> beam.Distinct()


def read_any_file_system(path, max_bytes):
    """A file's bytes from any Beam file system, with `read_image_bytes`'s byte cap.

    Raises:
        ImageError: the file cannot be read or is over `max_bytes`.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            contents = handle.read(max_bytes + 1)
    except (OSError, IOError) as err:
        raise ImageError(f"{path}: cannot read ({err})", path=path) from err
    if len(contents) > max_bytes:
        raise ImageError(f"{path}: more than {max_bytes} bytes is over the {max_bytes}-byte cap for one image",
                         path=path)
    return contents


class DecodeImages(beam.DoFn):
    """path -> (path, pixels); a file that cannot be used goes to the `failed` output as a row.

    Paths and errors are bytes (see `_PATH_ENCODING`); rows are (path, mos or None, error,
    extras): `extras` are a distribution model's `DISTRIBUTION_COLUMNS` values of a scored
    file, [] for a failed file or a regression model (`kiqa.scoring.table.csv_row`'s rule).
    """

    def __init__(self, image_size, max_pixels, max_bytes):
        super().__init__()
        self._image_size = tuple(image_size)
        self._max_pixels = int(max_pixels)
        self._max_bytes = int(max_bytes)
        self._decode = None

    def setup(self):
        # Traced once per worker process (kiqa.scoring.batches caches it), not per element.
        self._decode = image_decoder(self._image_size)

    def process(self, encoded_path):
        path = _text(encoded_path)
        reader = read_any_file_system if is_remote(path) else read_image_bytes
        try:
            pixels, error = load_pixels(path, self._decode, self._max_pixels, self._max_bytes, reader)
        except Exception as err:  # noqa: BLE001 - one file must never fail a bundle
            # A failed bundle is retried, and a file that always fails would be retried
            # until the job dies; as a row it is reported once and the job goes on.
            pixels, error = None, f"unexpected error reading or decoding the file ({type(err).__name__}: {err})"
        if error is None:
            yield encoded_path, pixels
        else:
            yield beam.pvalue.TaggedOutput(_FAILED, (encoded_path, None, _bytes(error), []))


def _scored_row(keyed):
    path, prediction = keyed
    # KiqaModelHandler's inference: the MOS, or a distribution model's row values by column.
    values = prediction.inference if isinstance(prediction.inference, dict) else {MOS_COLUMN: prediction.inference}
    mos, error = model_score(values[MOS_COLUMN])
    extras = [values[column] for column in DISTRIBUTION_COLUMNS] if mos is not None and len(values) > 1 else []
    return path, mos, _bytes(error or ""), extras


class ScoreImages(beam.PTransform):
    """paths (from `ListImages`) -> rows (path, mos or None, error, extras), path and error
    as bytes (see `DecodeImages`)."""

    def __init__(self, handler, image_size, max_pixels, max_bytes=DEFAULT_MAX_BYTES):
        super().__init__()
        self._handler = handler
        self._decode = DecodeImages(image_size, max_pixels, max_bytes)

    def expand(self, paths):
        decoded = paths | "Decode" >> beam.ParDo(self._decode).with_outputs(_FAILED, main="ok")
        scored = (
            decoded.ok
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
            | "ToRow" >> beam.Map(_scored_row)
        )
        return (scored, decoded[_FAILED]) | "Rows" >> beam.Flatten()


class _Counts(beam.CombineFn):
    """(files, scored, failed, sum of MOS) over all rows."""

    def create_accumulator(self):
        return 0, 0, 0, 0.0

    def add_input(self, counts, row):
        files, scored, failed, total = counts
        mos = row[1]
        if mos is None:
            return files + 1, scored, failed + 1, total
        return files + 1, scored + 1, failed, total + mos

    def merge_accumulators(self, accumulators):
        return tuple(map(sum, zip(*accumulators)))

    def extract_output(self, counts):
        files, scored, failed, total = counts
        return {"n_files": files, "n_scored": scored, "n_failed": failed,
                "mean_mos": round(total / scored, 4) if scored else None}


def _csv_line(row, columns=CSV_COLUMNS):
    # WriteToText adds the line's "\n" (kiqa.fsutil.csv_line's end): the bytes match kiqa score's CSV.
    path, mos, error, extras = row
    distribution = tuple(columns) == DISTRIBUTION_CSV_COLUMNS
    return encode_csv_line(csv_row(_text(path), mos, _text(error), extras if distribution else None))[:-1]


def _parquet_record(row, columns=CSV_COLUMNS):
    """A row as {column: value} over `columns` (a distribution model's values are None
    for a failed file)."""
    path, mos, error, extras = row
    # Parquet strings are UTF-8: an undecodable byte of a file name is written as \xNN
    # (the CSV keeps the raw name).
    values = {PATH_COLUMN: path.decode("utf-8", "backslashreplace"), MOS_COLUMN: mos,
              ERROR_COLUMN: error.decode("utf-8", "backslashreplace"), **dict(zip(DISTRIBUTION_COLUMNS, extras))}
    return {column: values.get(column) for column in columns}


def _parquet_schema(columns=CSV_COLUMNS):
    """`columns` as Parquet fields: the path and error are strings, every score float64."""
    import pyarrow

    text = (PATH_COLUMN, ERROR_COLUMN)
    return pyarrow.schema([(column, pyarrow.string() if column in text else pyarrow.float64())
                           for column in columns])


def _write_summary(counts, summary_path, model_identity, columns=CSV_COLUMNS):
    summary = {**counts, "columns": list(columns), "model": model_identity}
    with FileSystems.create(summary_path) as handle:
        handle.write((json.dumps(summary, indent=2) + "\n").encode())


class WriteScores(beam.PTransform):
    """rows -> PREFIX-SSSSS-of-NNNNN.csv / .parquet and PREFIX-summary.json.

    `columns`: `CSV_COLUMNS`, or `DISTRIBUTION_CSV_COLUMNS` for a distribution model (what
    `kiqa.scoring.table.csv_columns` gives for the scorer).
    """

    def __init__(self, prefix, model_identity, formats=FORMATS, num_shards=0, columns=CSV_COLUMNS):
        super().__init__()
        self._prefix = prefix
        self._identity = model_identity
        self._formats = tuple(formats)
        self._num_shards = num_shards
        self._columns = tuple(columns)

    def expand(self, rows):
        if "csv" in self._formats:
            _ = (
                rows
                | "CsvLine" >> beam.Map(_csv_line, self._columns)
                | "WriteCsv" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=".csv", num_shards=self._num_shards,
                    header=encode_csv_line(self._columns)[:-1])
            )
        if "parquet" in self._formats:
            _ = (
                rows
                | "ParquetRecord" >> beam.Map(_parquet_record, self._columns)
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, _parquet_schema(self._columns), file_name_suffix=".parquet",
                    num_shards=self._num_shards)
            )
        return (
            rows
            | "Count" >> beam.CombineGlobally(_Counts())
            | "WriteSummary" >> beam.Map(_write_summary, self._prefix + SUMMARY_SUFFIX, self._identity, self._columns)
        )


def existing_outputs(prefix):
    """Paths of the outputs an earlier run left at `prefix` (shards and the summary)."""
    patterns = [prefix + _SHARD_GLOB + f".{fmt}" for fmt in FORMATS] + [prefix + SUMMARY_SUFFIX]
    return sorted(m.path for result in FileSystems.match(patterns) for m in result.metadata_list)


def refuse_earlier_outputs(prefix, overwrite):
    """Refuses to mix with an earlier run's outputs unless allowed.

    Returns:
        The earlier outputs found (to delete once the job is known to start).

    Raises:
        DataError: outputs exist and `overwrite` is False.
    """
    found = existing_outputs(prefix)
    if found and not overwrite:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise DataError(
            f"output prefix {prefix} already holds the results of a run ({shown}); choose "
            f"another prefix, or allow overwriting to replace them"
        )
    return found


def describe_model(model_ref, image_size=None, safe_mode=True, engine="tf"):
    """Loads the model once on the launcher: checks it and records what was used.

    A SavedModel base path is pinned to its highest version here, so every worker loads
    the same version even if a new one is published during the job.

    Returns:
        (model ref for the workers, image_size, max_pixels, identity dict for the summary,
        the rows' columns: `kiqa score`'s CSV header for this model).

    Raises:
        ModelError: the model cannot be loaded (the message says why).
    """
    from kiqa.scoring.scorer import load_scorer

    workdir = tempfile.mkdtemp(prefix="kiqa-beam-model-")
    try:
        local = local_copy(model_ref, workdir) if is_remote(model_ref) else str(model_ref)
        scorer = load_scorer(local, image_size=image_size, safe_mode=safe_mode, engine=engine)
        worker_ref, identity = str(model_ref), {"model": str(model_ref), "kind": scorer.kind}
        identity.update(scorer.model_facts())
        if scorer.kind == "savedmodel":
            from kiqa.serving import savedmodel

            suffix = os.path.relpath(scorer.source, local)
            if suffix != ".":
                worker_ref = str(model_ref).rstrip("/") + "/" + suffix.replace(os.sep, "/")
            metadata = savedmodel.read_export_metadata(scorer.source)
            identity.update(source=worker_ref, signature="score_pixels",
                            version=metadata.get("version"), export=metadata)
        else:
            identity.update(source=scorer.source if not is_remote(model_ref) else worker_ref,
                            signature=None, version=None)
        identity.update(image_size=list(scorer.image_size), max_pixels=scorer.max_pixels)
        return worker_ref, scorer.image_size, scorer.max_pixels, identity, csv_columns(scorer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build(root, listing, job, worker_ref, image_size, max_pixels, identity, columns=CSV_COLUMNS):
    """Adds the scoring steps after `listing` (a `ListImages`) to pipeline `root`; rows
    are written with `columns` (`describe_model` gives the model's)."""
    handler = KiqaModelHandler(worker_ref, image_size=image_size, safe_mode=job.safe_mode,
                               batch_size=job.batch_size, large_model=job.large_model, engine=job.engine)
    return (
        root
        | "ListImages" >> listing
        | "Score" >> ScoreImages(handler, image_size, max_pixels, job.max_bytes)
        | "Write" >> WriteScores(job.output, identity, job.formats, job.num_shards, columns)
    )


def score_with_beam(job, pipeline_options):
    """Runs the scoring pipeline to the end and returns its summary.

    Args:
        job: a `BeamScoreJob`.
        pipeline_options: `apache_beam.options.pipeline_options.PipelineOptions`
            (runner, project, workers, ...), passed through untouched.

    Returns:
        The summary dict written to PREFIX-summary.json (counts, the rows' columns and the
        model's identity).

    Raises:
        DataError: an input matches nothing, or the output prefix holds an earlier run.
        ModelError: the model cannot be loaded.
    """
    unknown = sorted(set(job.formats) - set(FORMATS))
    if unknown or not job.formats:
        raise DataError(f"output formats must be among {list(FORMATS)}, got {list(job.formats)}")
    earlier = refuse_earlier_outputs(job.output, job.overwrite)
    listing = ListImages(job.inputs, job.input_lists)
    worker_ref, image_size, max_pixels, identity, columns = describe_model(
        job.model, job.image_size, job.safe_mode, job.engine)
    # Deleted only now that inputs and model are checked, and all of them: a rerun with
    # fewer shards would otherwise leave old shards that readers of PREFIX-* take for new.
    if earlier:
        FileSystems.delete(earlier)
    with beam.Pipeline(options=pipeline_options) as root:
        build(root, listing, job, worker_ref, image_size, max_pixels, identity, columns)
    with FileSystems.open(job.output + SUMMARY_SUFFIX) as handle:
        return json.load(io.TextIOWrapper(handle, encoding="utf-8"))
