"""Files the project writes: whole or not at all, with the permissions the user's umask gives."""

import os
import tempfile
from pathlib import Path

from cars.errors import UserError


def default_mode(folder: bool = False) -> int:
    """The permissions open() or mkdir() would give a new file or folder under the user's umask
    (0644 / 0755 under 022). Temporary files and folders are made 0600 / 0700 instead."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def make_folder(folder: Path, elsewhere: str = "--out") -> None:
    """`folder` and its parents, if missing; a path that cannot be one is one clear line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write {folder}: {error.strerror or error}; choose another {elsewhere}") from None


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`:
    a crash at any instant leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, default_mode())  # shared like any file the user writes, not private like a temporary one
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a read-only or vanished folder
            raise UserError(f"cannot write {path}: {error.strerror or error}; free some space or choose another --run-dir. "
                            "The previous files are intact") from None
        raise
