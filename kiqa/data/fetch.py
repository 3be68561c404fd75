"""Download KonIQ-10k from its official site: resumable, verified, safely extracted.

`fetch_koniq(out_dir)` downloads the dataset's archives (the 1024x768 images and the
score file, or the 512x384 copy), checks each one's size and sha256, extracts it without
letting any member escape `out_dir`, fetches the official split file from the authors'
GitHub repository, and checks that every image the labels name is on disk. A rerun after
success makes no request at all; a rerun after a failure resumes where it stopped.

Layout after a full fetch (what training's `labels` setting expects):

    out_dir/
      koniq10k_distributions_sets.csv        official split file (0-100 `MOS` + `set`)
      koniq10k_scores_and_distributions.csv  the download's labels (0-100 `MOS_zscore`)
      1024x768/<id>.jpg                      the 10,073 images
      koniq10k_1024x768.zip ...              the archives, kept so a rerun can verify them
      .kiqa-fetch.json                       what was downloaded, verified and extracted

Only the standard library does the HTTP (urllib): no `requests` dependency for one command.
"""

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Optional

import pandas as pd
from tqdm.auto import tqdm

from kiqa import __version__
from kiqa.contract import IMAGE_EXTENSIONS
from kiqa.data.koniq import check_image_names, read_labels
from kiqa.errors import (
    ChecksumError, ConfigError, DataError, DownloadDeadlineError, DownloadError, UnsafeArchiveError,
)
from kiqa.fsutil import require_free_space, sha256_of, write_json_atomically

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://datasets.vqa.mmsp-kn.de/archives/"
# The official split is not inside the dataset's zips: it is in the authors' MIT-licensed
# repository (subpic/koniq), whose default branch is `master`.
SPLIT_FILE = "koniq10k_distributions_sets.csv"
SPLIT_FILE_URL = f"https://raw.githubusercontent.com/subpic/koniq/master/metadata/{SPLIT_FILE}"
DOWNLOAD_LABELS = "koniq10k_scores_and_distributions.csv"

DEFAULT_ARCHIVES = ("koniq10k_1024x768.zip", "koniq10k_scores_and_distributions.zip")
SMALL_ARCHIVES = ("koniq10k_512x384.zip", "koniq10k_scores_and_distributions.zip")
STATE_FILE = ".kiqa-fetch.json"

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT = 60.0  # seconds per connect or read, not for the whole file
# Seconds for one file's whole download, retries included: a server that trickles a byte
# every few seconds never trips the per-read timeout. 6 h lets the 2.5 GB archive through
# at 120 kB/s; the bytes received are kept, and a rerun resumes after them.
DEFAULT_DEADLINE = 6 * 3600.0
DEFAULT_RETRIES = 4
RETRY_BACKOFF = 1.0  # seconds before the 2nd attempt, doubling after each failure (max 30)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a downloaded file must be. None means unknown (not checked).

    Attributes:
        size: size in bytes.
        sha256: lowercase hex digest.
        about: the download's size for people (the fetch command's help and docs/training.md
            quote it): a measured figure, or "size unverified" when none was measured.
    """

    size: Optional[int] = None
    sha256: Optional[str] = None
    about: str = "size unverified"


# The KonIQ site publishes neither sizes nor checksums of its archives, and they could not
# be measured where kiqa was written (no network). So they stay unknown: the size is checked
# against the server's Content-Length, the sha256 is computed and recorded in
# .kiqa-fetch.json (and logged), and users who have a trusted value pin it with
# `--sha256 NAME=HEX`. Fill these in once measured on a trusted download.
# The archives' sizes were not measured either. Third-party download notes disagree (the
# 1024x768 zip is called "~2 GB" in some, "~4 GB" in others; kiqa's README once said 2.5 GB
# and its --help 6 GB), so no figure is given rather than a guess.
EXPECTED = {
    "koniq10k_1024x768.zip": Expected(),
    "koniq10k_512x384.zip": Expected(),
    "koniq10k_scores_and_distributions.zip": Expected(),
    # Measured on the copy of subpic/koniq's file in kiqa's reference data (10,073 rows).
    SPLIT_FILE: Expected(
        size=1147194, sha256="d0bd1ad54a60bc36fe172049e46ac76c83554e50ab84acebfd47b82b3e698a0a",
        about="1.1 MB, measured",
    ),
}


def describe_downloads(archives=DEFAULT_ARCHIVES):
    """One line per file `fetch_koniq` downloads, with its size as `EXPECTED` knows it.

    Args:
        archives: the archive names (DEFAULT_ARCHIVES or SMALL_ARCHIVES).

    Returns:
        e.g. "koniq10k_1024x768.zip (size unverified), ..., koniq10k_distributions_sets.csv (1.1 MB, measured)".
    """
    return ", ".join(f"{name} ({EXPECTED[name].about})" for name in (*archives, SPLIT_FILE))


class _Retry(Exception):
    """A transient failure: keep the .part file and try again (resuming)."""


def fetch_koniq(
    out_dir,
    base_url=OFFICIAL_BASE_URL,
    archives=DEFAULT_ARCHIVES,
    expected=None,
    progress=True,
    *,
    split_file_url=SPLIT_FILE_URL,
    timeout=DEFAULT_TIMEOUT,
    retries=DEFAULT_RETRIES,
    deadline=DEFAULT_DEADLINE,
):
    """Downloads, verifies and extracts KonIQ-10k, then checks that every image is there.

    Args:
        out_dir: folder to fetch into (created if needed).
        base_url: where the archives are; each one's URL is `base_url` + its name.
        archives: archive file names to fetch. The default is the 1024x768 images and
            the score file; `SMALL_ARCHIVES` fetches the 512x384 copy instead.
        expected: {name: Expected or {"size": .., "sha256": ..}} overriding or adding to
            `EXPECTED` (the given fields win; None fields keep the table's value).
        progress: show tqdm progress bars.
        split_file_url: where to get the official split file; None skips it. Failing
            to fetch it only logs a warning: random splits work without it.
        timeout: seconds allowed for each connect or read.
        retries: attempts per file for transient failures (dropped connections,
            timeouts, 5xx), each resuming where the last one stopped.
        deadline: seconds allowed for each file's whole download, retries included
            (None: no limit); what arrived is kept for a rerun to resume.

    Returns:
        Path of the label file to train with: the official split file when it was
        fetched, else `koniq10k_scores_and_distributions.csv`.

    Raises:
        ConfigError: an archive name or an expected checksum is malformed.
        DataError: a download failed for good, a size or checksum is wrong (the bad
            file is deleted), an archive is unsafe or corrupt, there is no label
            file, or images named in the labels are missing (listed).
    """
    out_dir = Path(out_dir)
    table = merge_expected(expected)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the download folder {out_dir} ({err.strerror}); choose another DIR") from err
    state = _State(out_dir / STATE_FILE)
    options = dict(progress=progress, timeout=timeout, retries=retries, deadline=deadline)

    for name in archives:
        _check_file_name(name)
        entry = state.files.get(name, {})
        want = table.get(name, Expected())
        if entry.get("extracted") and _agrees(entry, want):
            logger.info("%s: already downloaded and extracted; nothing to do", name)
            continue
        archive = out_dir / name
        if archive.is_file() and not entry:
            entry = _adopt(archive, want) or {}
        if not (archive.is_file() and entry.get("size") == archive.stat().st_size and _agrees(entry, want)):
            url = _join_url(base_url, name)
            size, digest = download(url, archive, want, **options)
            entry = {"url": url, "size": size, "sha256": digest, "extracted": False}
        state.files[name] = entry
        state.save()
        entry.update(extract_archive(archive, out_dir, progress=progress))
        entry["extracted"] = True
        state.save()

    if split_file_url:
        _fetch_split_file(out_dir, split_file_url, table.get(SPLIT_FILE, Expected()), state, options)

    labels = _label_files(out_dir, state)
    if not labels:
        raise DataError(
            f"{out_dir}: no KonIQ label file after fetching {list(archives)}; include "
            f"koniq10k_scores_and_distributions.zip (it holds {DOWNLOAD_LABELS})"
        )
    roots = sorted({root for entry in state.files.values() for root in entry.get("image_roots", [])})
    if not roots:
        logger.warning("%s: no image archive was fetched, so image presence was not checked", out_dir)
    for root in roots:
        check_images_present(labels, out_dir / root, state_file=state.path)
    return labels[0]


def merge_expected(expected=None):
    """`EXPECTED` with user values laid over it.

    Args:
        expected: {name: Expected or dict} or None.

    Returns:
        {name: Expected}.

    Raises:
        ConfigError: a sha256 is not 64 hex digits, or a size is not a positive integer.
    """
    table = dict(EXPECTED)
    for name, value in (expected or {}).items():
        if isinstance(value, dict):
            value = Expected(**value)
        base = table.get(name, Expected())
        sha = value.sha256.lower() if value.sha256 else base.sha256
        size = value.size if value.size is not None else base.size
        if sha is not None and not _SHA256_HEX.match(sha):
            raise ConfigError(f"sha256 for {name} must be 64 hex digits, got {value.sha256!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"expected size for {name} must be a positive integer, got {size!r}")
        table[name] = Expected(size=size, sha256=sha, about=base.about)
    return table


def download(url, dest, expected=Expected(), progress=True, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES,
             deadline=DEFAULT_DEADLINE):
    """Downloads `url` to `dest`, resuming `dest.part`, and verifies size and sha256.

    The body goes to `<dest>.part`; an interrupted download is resumed with an HTTP
    Range request (guarded by If-Range, so a file changed on the server restarts
    instead of being spliced). A server that ignores Range (answers 200) is
    downloaded again from byte 0. `dest` appears only once the file verifies.

    Args:
        url: http(s) or file URL.
        dest: final path.
        expected: `Expected` size and sha256 (None fields are not checked).
        progress: show a tqdm bar.
        timeout: seconds allowed for each connect or read.
        retries: attempts for transient failures, each resuming.
        deadline: seconds allowed for the whole download, retries included (None: no
            limit); a read never waits past it by more than `timeout`.

    Returns:
        (size, sha256) of the verified file.

    Raises:
        DataError: not found or refused (4xx), still failing after `retries`
            attempts, a size or checksum mismatch (the bad file is deleted), or over
            the deadline (`DownloadDeadlineError`; the bytes received are kept).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    last_error = None
    stop_at = None if deadline is None else time.monotonic() + deadline
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, dest.name, part, meta_path, expected, progress, timeout, stop_at)
            break
        except _Expired:
            _over_deadline(url, dest.name, part, deadline)
        except OSError as err:
            # Network errors became _Retry inside; what is left is the local disk.
            raise DataError(f"{part}: cannot write ({err}); free space or choose another folder") from err
        except _Retry as err:
            last_error = err
            done = part.stat().st_size if part.exists() else 0
            logger.warning("%s: %s (attempt %d of %d; %d bytes kept)", dest.name, err, attempt, retries, done)
            if attempt < retries:
                pause = min(RETRY_BACKOFF * 2.0 ** (attempt - 1), 30.0)
                if stop_at is not None and time.monotonic() + pause >= stop_at:
                    _over_deadline(url, dest.name, part, deadline)
                time.sleep(pause)
    else:
        done = part.stat().st_size if part.exists() else 0
        raise DataError(
            f"{dest.name}: download from {url} failed {retries} times, last: {last_error}. "
            f"{done} bytes are kept in {part}; rerun the same command to resume"
        )
    size, digest = _verify(part, dest.name, expected, meta_path)
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    return size, digest


def _over_deadline(url, name, part, deadline):
    done = part.stat().st_size if part.exists() else 0
    raise DownloadDeadlineError(
        f"{name}: the download from {url} did not finish within its deadline of {deadline:g} s "
        f"(the server sends too slowly); {done} bytes are kept in {part} and a rerun resumes after them",
        url=url, deadline=deadline, received=done,
    )


def _download_once(url, name, part, meta_path, expected, progress, timeout, stop_at=None):
    """One request: appends to (or restarts) `part`. Raises _Retry on transient failures."""
    resume = _resume_point(name, part, meta_path, expected)
    if resume is None:
        return  # complete already (interrupted between the last byte and the rename)
    offset, meta = resume
    response = _open(url, name, _request_headers(offset, meta), offset, part, meta_path, timeout)
    with response:
        offset, mode, total = _answered_range(response, url, name, offset, part, meta_path, expected)
        if offset == 0:
            _record_validator(response, url, total, meta_path)
        if total is not None:
            _check_free_space(part.parent, total - offset, name)
        _stream(response, part, mode, total, offset, name, progress, stop_at)
    _check_received(part, total, meta_path)


def _resume_point(name, part, meta_path, expected):
    """(bytes already in `part`, its recorded meta), or None when `part` is complete."""
    meta = _read_json(meta_path)
    offset = part.stat().st_size if part.exists() else 0
    if offset and expected.size is not None and offset > expected.size:
        logger.warning("%s: partial file is larger than the expected size; starting over", name)
        part.unlink()
        offset, meta = 0, {}
    if offset and offset in (meta.get("total"), expected.size):
        return None
    return offset, meta


def _request_headers(offset, meta):
    headers = {"User-Agent": f"kiqa/{__version__} (fetch-koniq)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            # If the file changed on the server since the first bytes, the server sends
            # it whole (200) instead of splicing new bytes onto old ones.
            headers["If-Range"] = meta["validator"]
    return headers


def _open(url, name, headers, offset, part, meta_path, timeout):
    """The HTTP response; transient failures raise _Retry, refusals DataError."""
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            # The range starts at or past the end: stale or complete .part. Start over.
            logger.warning("%s: server refused to resume at byte %d; starting over", name, offset)
            part.unlink()
            meta_path.unlink(missing_ok=True)
            raise _Retry("range not satisfiable") from err
        if err.code in (408, 429) or err.code >= 500:
            raise _Retry(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(
            f"{name}: {url} answered HTTP {err.code} {err.reason}; check the address "
            "or try again later",
            name=name, url=url, status=err.code,
        ) from err
    except (urllib.error.URLError, HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(err, urllib.error.URLError) and not isinstance(reason, (OSError, socket.timeout)):
            raise DataError(f"{name}: cannot open {url}: {reason}") from err
        raise _Retry(f"cannot connect: {reason}") from err


def _answered_range(response, url, name, offset, part, meta_path, expected):
    """(offset the body starts at, file mode, total size or None) from the response."""
    status = getattr(response, "status", None) or 200  # file:// URLs have no status
    if status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            logger.warning("%s: server resumed at byte %s instead of %d; starting over", name, start, offset)
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise _Retry("server answered a different range")
        mode = "ab"
    else:
        if offset:
            logger.warning("%s: server ignored the Range request (HTTP %d); downloading again "
                           "from byte 0", name, status)
        offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    if expected.size is not None and total is not None and total != expected.size:
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise DataError(
            f"{name}: {url} serves {total} bytes but {expected.size} are expected; the "
            "server's file is not the expected one (check the address), nothing was kept"
        )
    return offset, mode, total


def _record_validator(response, url, total, meta_path):
    """Records what a resumed request must send as If-Range (a strong ETag, else Last-Modified)."""
    etag = response.headers.get("ETag")
    # If-Range takes only a strong ETag (RFC 9110); a weak one would always restart.
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    write_json_atomically(meta_path, {"url": url, "total": total, "validator": validator}, sort_keys=True)


class _Expired(Exception):
    """The download's deadline passed (see `download`)."""


def _stream(response, part, mode, total, offset, name, progress, stop_at=None):
    # read1: whatever one socket read brings, so a trickling server cannot hold us inside
    # one read() of CHUNK_BYTES past the deadline.
    read = getattr(response, "read1", response.read)
    with open(part, mode) as handle, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
        desc=name, disable=not progress, leave=False,
    ) as bar:
        while True:
            if stop_at is not None and time.monotonic() >= stop_at:
                raise _Expired()
            try:
                chunk = read(CHUNK_BYTES)
            except (HTTPException, OSError) as err:
                raise _Retry(f"connection broke: {err or type(err).__name__}") from err
            if not chunk:
                break
            handle.write(chunk)  # a full disk is not transient: it is not retried
            bar.update(len(chunk))


def _check_received(part, total, meta_path):
    received = part.stat().st_size
    if total is not None and received < total:
        # urllib returns b"" at an early EOF instead of raising: count the bytes.
        raise _Retry(f"connection closed at byte {received} of {total}")
    if total is not None and received > total:
        part.unlink()
        meta_path.unlink(missing_ok=True)
        raise _Retry(f"received {received} bytes, more than the announced {total}; starting over")


def _verify(part, name, expected, meta_path):
    size = part.stat().st_size
    digest = sha256_of(part)
    mismatch = None
    if expected.size is not None and size != expected.size:
        mismatch = ("size", expected.size, size, f"size mismatch: expected {expected.size} bytes, got {size}")
    elif expected.sha256 is not None and digest != expected.sha256:
        mismatch = ("sha256", expected.sha256, digest, f"sha256 mismatch: expected {expected.sha256}, got {digest}")
    if mismatch:
        part.unlink()
        meta_path.unlink(missing_ok=True)
        problem, want, got, text = mismatch
        raise ChecksumError(
            f"{name}: {text}. The download was corrupted or the server's file changed; "
            "the bad file was deleted. Rerun to download it again; if the archive was "
            "legitimately updated, expect the new digest",
            name=name, problem=problem, expected=want, actual=got,
        )
    if expected.sha256 is None:
        logger.info("%s: sha256 %s (%d bytes); no published value to check it against (recorded "
                    "in %s, to pin for later fetches)", name, digest, size, STATE_FILE)
    return size, digest


def extract_archive(archive, out_dir, progress=True):
    """Extracts a zip into `out_dir`, refusing any member that could land outside it.

    Every member is checked before anything is written: absolute paths, drive
    letters, `..` components and symbolic links are refused (zip-slip). The archive is
    extracted into a hidden staging folder inside `out_dir` and then moved into place,
    so an interrupted extraction leaves no half-filled image folder behind.

    Args:
        archive: the zip file.
        out_dir: destination folder.
        progress: show a tqdm bar.

    Returns:
        {"image_roots": [folders holding the archive's images, relative to out_dir],
        "csv": [CSV members]}.

    Raises:
        DataError: the file is not a valid zip, has unsafe members (listed), fails its
            CRC checks, or would not fit on the disk.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            unsafe = [info.filename for info in members if _unsafe_member(info)]
            if unsafe:
                raise UnsafeArchiveError(
                    f"{archive}: refusing to extract: {len(unsafe)} member(s) would be written "
                    f"outside {out_dir} or are links: {unsafe[:10]}. The archive is not the "
                    "official one; delete it and check where it came from",
                    archive=str(archive), members=unsafe[:10],
                )
            _check_free_space(out_dir, sum(info.file_size for info in members), archive.name)
            staging = out_dir / f".{archive.name}.extracting"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                for info in tqdm(members, desc=f"extracting {archive.name}", unit="file",
                                 disable=not progress, leave=False):
                    zipped.extract(info, staging)
                children = sorted(staging.iterdir())
                for child in children:  # every clash is refused before anything moves
                    _move_into(child, out_dir / child.name, check_only=True)
                for child in children:
                    _move_into(child, out_dir / child.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise DataError(
            f"{archive}: not a valid zip archive ({err}); delete it and rerun to download it again"
        ) from err
    except OSError as err:
        raise DataError(f"{archive}: cannot extract into {out_dir} ({err}); free space or fix permissions") from err
    names = [info.filename for info in members if not info.is_dir()]
    parents = collections.Counter(
        str(PurePosixPath(n).parent) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
    )
    return {
        "image_roots": [parents.most_common(1)[0][0]] if parents else [],
        "csv": sorted(n for n in names if n.lower().endswith(".csv")),
    }


def _unsafe_member(info):
    name = info.filename.replace("\\", "/")
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    if ".." in PurePosixPath(name).parts:
        return True
    # Unix mode bits sit in the high 16 bits of external_attr; zipfile would write a
    # link as a small file holding its target, and a later member could go through it.
    return stat.S_ISLNK(info.external_attr >> 16)


def _move_into(src, dst, check_only=False):
    """Moves `src` to `dst`, merging folders (two archives may share a top folder).

    A file from the archive replaces a file of the same name (a rerun extracts the same
    archive again), but never a folder, and a folder never replaces a file: kiqa does not
    remove what it cannot prove it wrote.

    Args:
        src: a file or folder in the staging folder.
        dst: where it goes.
        check_only: only raise on a clash, move nothing.

    Raises:
        DataError: `dst` is a folder and `src` a file, or the other way round.
    """
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _move_into(child, dst / child.name, check_only)
        return
    if dst.is_dir() or (src.is_dir() and os.path.lexists(dst)):
        kind, other = ("folder", "file") if dst.is_dir() else ("file", "folder")
        raise DataError(
            f"{dst} is a {kind} and the archive holds a {other} of that name; it is left untouched: "
            f"move it away, or fetch into another folder"
        )
    if not check_only:
        os.replace(src, dst)


def check_images_present(label_files, image_root, state_file=None):
    """Checks that every image named in the label files is a file under `image_root`.

    Args:
        label_files: KonIQ-format CSVs (read with `kiqa.data.koniq.read_labels`).
        image_root: the image folder.
        state_file: the fetch record, named in the fix.

    Returns:
        The number of images checked.

    Raises:
        DataError: listing the missing images (first 20) and how many there are.
    """
    names = []
    for path in label_files:
        names.extend(read_labels(path)["image_name"])
    names = list(dict.fromkeys(names))  # both KonIQ label files name the same images
    _, problems = check_image_names(pd.DataFrame({"image_name": names}), image_root)
    if problems:
        listing = "\n".join(f"  {name}" for name, _ in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        redo = f"delete {state_file} and rerun" if state_file else "rerun"
        raise DataError(
            f"{len(problems)} of {len(names)} images named in {', '.join(str(p) for p in label_files)} "
            f"are missing from {image_root}:\n{listing}{more}\nThe archive may be incomplete or "
            f"the folder was changed: {redo} to extract again (delete the .zip too to download it again)"
        )
    return len(names)


def _fetch_split_file(out_dir, url, want, state, options):
    """The official split file: optional, so every failure is a warning."""
    path = out_dir / SPLIT_FILE
    entry = state.files.get(SPLIT_FILE, {})
    if path.is_file() and entry.get("size") == path.stat().st_size and _agrees(entry, want):
        return
    try:
        size, digest = download(url, path, want, **options)
        read_labels(path)
    except DataError as err:
        if path.exists() and not entry:
            path.unlink()  # it did not parse as a KonIQ label file
        logger.warning(
            "official split file not fetched (%s). Training still works with a random or "
            "repeated split; to get it, download %s into %s", err, url, out_dir,
        )
        return
    state.files[SPLIT_FILE] = {"url": url, "size": size, "sha256": digest}
    state.save()


def _label_files(out_dir, state):
    """The label files on disk, best first: the official split file, then the download's."""
    found = []
    if SPLIT_FILE in state.files and (out_dir / SPLIT_FILE).is_file():
        found.append(out_dir / SPLIT_FILE)
    csvs = [c for entry in state.files.values() for c in entry.get("csv", [])]
    for csv in sorted(csvs, key=lambda c: (PurePosixPath(c).name != DOWNLOAD_LABELS, c)):
        if PurePosixPath(csv).name in (DOWNLOAD_LABELS, SPLIT_FILE) and (out_dir / csv).is_file():
            found.append(out_dir / csv)
    return found


def _adopt(archive, want):
    """An archive already in the folder but not fetched by kiqa (e.g. downloaded by hand).

    kiqa itself never leaves a partial file under the final name (it downloads to
    `.part`), so such a file was put there on purpose. It is used if it matches what is
    expected; with nothing expected, its checksum is recorded and logged.
    """
    size, digest = archive.stat().st_size, sha256_of(archive)
    entry = {"url": None, "size": size, "sha256": digest, "extracted": False}
    if not _agrees(entry, want):
        logger.warning("%s: the file already in the folder does not match the expected "
                       "size or sha256; downloading it again", archive.name)
        return None
    logger.info("%s: using the file already in the folder (sha256 %s)", archive.name, digest)
    return entry


def _agrees(entry, want):
    """A recorded download still satisfies what is expected now (e.g. a newly pinned sha256)."""
    return (want.sha256 is None or entry.get("sha256") == want.sha256) and (
        want.size is None or entry.get("size") == want.size
    )


def _check_file_name(name):
    if not name or name != PurePosixPath(name).name or name in (".", ".."):
        raise ConfigError(f"archive name {name!r} must be a plain file name like koniq10k_1024x768.zip")


def _join_url(base_url, name):
    return base_url.rstrip("/") + "/" + urllib.parse.quote(name)


def _parse_content_range(value):
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not match:
        raise _Retry(f"unreadable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _check_free_space(folder, needed, name):
    require_free_space(folder, needed, f"{name} needs", kept="Free space there, or fetch into another folder")


def _read_json(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _State:
    """`.kiqa-fetch.json`: per file, its URL, size, sha256 and whether it was extracted."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = _read_json(self.path).get("files", {})

    def save(self):
        write_json_atomically(self.path, {"kiqa_version": __version__, "files": self.files}, sort_keys=True)
