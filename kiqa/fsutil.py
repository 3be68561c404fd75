"""File-system steps shared by everything that publishes a finished folder."""

import os
import shutil


def swap_directory(new, target, aside):
    """Replaces folder `target` with folder `new` by two renames.

    The old `target` waits at `aside` between the renames, so a reader never sees a
    half-written folder; if the second rename fails, the old one is put back. The old
    folder is deleted once the new one is in place.

    Args:
        new: the finished folder.
        target: the folder to replace (must exist).
        aside: where the old folder waits; must not exist, or be an empty folder.

    Raises:
        OSError: a rename failed (the old folder is back at `target`).
    """
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
