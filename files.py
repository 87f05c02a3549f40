"""Writing files that users keep, so that nothing they had is lost or changed behind their back.

Every file the project writes (model files, checkpoints, caches, sidecars, photos with embedded captions, result
lists) goes through `atomic_write`: written whole to a temporary file beside the target and renamed over it.
"""

import os
import tempfile
from collections.abc import Callable


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (elsewhere set and put straight back)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


class UnsafeTargetError(OSError):
    """A target that an atomic replace would damage; the message says why."""


def write_target(path: str | os.PathLike) -> str:
    """Where writing `path` really goes: the file a symbolic link points to (the link is kept).

    Raises UnsafeTargetError for a file with several hard links: replacing it would split its names, the others
    keeping the old content.
    """
    target = os.path.realpath(path)
    try:
        links = os.stat(target).st_nlink
    except FileNotFoundError:
        return target
    if links > 1:
        raise UnsafeTargetError(f"{os.fspath(path)}: has {links} hard links; replacing it would split them")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)`, then move the result over `path` in one step.

    A crash or a failed write (disk full) leaves the previous file at `path` untouched and no temporary behind. A
    symbolic link is followed and kept; a replaced file keeps its permissions, a new one gets the user's umask.
    """
    target = write_target(path)
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(handle)
    try:
        mode = os.stat(target).st_mode & 0o7777 if os.path.exists(target) else 0o666 & ~current_umask()
        write(temporary)
        os.chmod(temporary, mode)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
