"""Finding the image files to score under files and folders.

Folders are searched recursively for image extensions; TIFF, AVIF, HEIC/HEIF and JPEG XL
files are listed too, so each gets an error row saying to convert it instead of being
skipped silently. Symbolic links that point outside the folders given are listed with an
error instead of followed (a link in a folder of downloads must not make kiqa read
/dev/zero or a private file).
"""

import errno
import os

from kiqa.contract import IMAGE_EXTENSIONS
from kiqa.errors import DataError


# exports holds TIFFs, HEICs (iPhones), AVIFs and JPEG XLs, and skipping them silently
# would report a job as complete with files missing. Each gets an error row naming its
# format and saying to convert it (a file that is in fact a JPEG or PNG is scored).
UNSUPPORTED_FORMATS = {
    ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL",
}
LISTED_UNSUPPORTED_EXTENSIONS = tuple(UNSUPPORTED_FORMATS)


def has_image_extension(name):
    """True if `name` ends with one of `kiqa.image.IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_listed(name):
    return has_image_extension(name) or name.lower().endswith(LISTED_UNSUPPORTED_EXTENSIONS)


def _inside(path, roots):
    return any(path == root or os.path.commonpath([path, root]) == root for root in roots)


def find_images(paths, follow_links_outside=False):
    """Lists the image files to score under files and folders.

    Folders are searched recursively for `IMAGE_EXTENSIONS` (any case), plus TIFF,
    AVIF, HEIC/HEIF and JPEG XL files, which are listed so that each gets an error row
    saying to convert it instead of being skipped silently; files named directly are taken whatever their
    extension. Each folder's files are sorted by path, so two runs list the same
    files in the same order; a file reached twice is listed once.

    Symbolic links found inside a folder are followed only when their target lies
    inside one of the given paths (links to folders inside them are not followed at
    all: their files are reached by their real path). Links leaving the given paths
    are listed with an error unless `follow_links_outside` is set.

    Args:
        paths: files and folders.
        follow_links_outside: follow links whose target is outside the given paths.

    Returns:
        List of (path, error) in scoring order: `path` is the given path joined with
        the file's relative path (normalised; a `str` under `kiqa.fsutil`'s rule, so a
        name that is not valid UTF-8 keeps its bytes as surrogates); `error` is None or why the file will
        not be read. A given path that does not exist is listed as given (reading it fails).
    """
    if any(not os.fspath(p) for p in paths):
        # normpath("") is ".": an empty argument (an unset shell variable) must not
        # quietly score the whole current folder.
        raise DataError("empty path given to score (an empty argument, e.g. an unset variable); "
                        "give image files or folders")
    # A path that does not exist is listed like a file: reading it gives the same error row
    # as `Scorer.score_many` gives (one rule for a missing path, not an abort of the job).
    roots = [os.path.normpath(os.fsdecode(p)) for p in paths]
    real_roots = [os.path.realpath(root) for root in roots]
    found = {}
    for root in roots:
        # A path the user names is taken as given, link or not: they chose it.
        entries = _walk(root, real_roots, follow_links_outside) if os.path.isdir(root) else [(root, None)]
        for path, error in sorted(entries):
            found.setdefault(path, error)
    return list(found.items())


def _walk(root, real_roots, follow_links_outside):
    entries = []
    visited = {os.path.realpath(root)}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as scan:
                children = list(scan)
        except OSError as err:
            entries.append((folder, f"cannot list folder ({err.strerror}); check its permissions"))
            continue
        for child in children:
            path = os.path.normpath(child.path)
            if child.is_symlink():
                target = os.path.realpath(path)
                inside = _inside(target, real_roots)
                if os.path.isdir(path):
                    if inside:
                        continue  # its files are listed under their real path (and no loops)
                    if not follow_links_outside:
                        entries.append((path, _link_error("folder", target)))
                    elif target not in visited:
                        visited.add(target)
                        folders.append(path)
                    continue
                if not _is_listed(child.name):
                    continue
                if not os.path.exists(path):
                    entries.append((path, _broken_link_error(path)))
                    continue
                allowed = inside or follow_links_outside
                entries.append((path, None if allowed else _link_error("file", target)))
            elif child.is_dir(follow_symlinks=False):
                folders.append(path)
            elif _is_listed(child.name):
                # Devices and pipes named *.jpg stay in: read_image_bytes refuses them by name.
                entries.append((path, None))
    return entries


def _broken_link_error(path):
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop; remove or fix the link"
    return f"dangling symbolic link (its target {os.path.realpath(path)} does not exist); remove or fix the link"


# The start of the error text of a link that leaves the given folders: the CLI names its
# flag for following them when a row starts so.
LINK_OUTSIDE = "symbolic link to a {kind} outside the given folders"


def _link_error(kind, target):
    return f"{LINK_OUTSIDE.format(kind=kind)} ({target}); not followed"


def is_link_outside(error):
    """True when an error row's text is a link left unfollowed (see `find_images`)."""
    return bool(error) and any(error.startswith(LINK_OUTSIDE.format(kind=k)) for k in ("file", "folder"))
