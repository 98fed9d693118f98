"""Files the project writes: whole or not at all, with the permissions the user's umask gives."""

import ctypes
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
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


@contextmanager
def interrupts_held():
    """Ctrl-C or SIGTERM in the block is raised when the block ends, not inside it. An interrupt in the middle of
    torch.save's C++ writer cut the file short and came out as that writer's error (exit 1, the run marked crashed);
    held, the file is finished and the run stops as any interrupted run does (exit 130). Nested blocks hold it until
    the outermost ends. Only the main thread receives signals; elsewhere this does nothing."""
    kinds = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, kinds):
        yield  # None: a handler set outside Python, which could not be put back
        return
    received = []
    previous = {kind: signal.signal(kind, lambda signum, frame: received.append(signum)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        if received:
            signal.raise_signal(received[0])  # to the handler it was meant for, now that the block is done


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`:
    a crash at any instant leaves either the old file or the new one, never half of one; an interrupt waits for the
    file (interrupts_held)."""
    path = Path(path)
    tmp = None
    try:
        with interrupts_held():
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
            raise UserError(
                f"cannot write {path}: {error.strerror or error}; free some space or choose another --run-dir. "
                "The previous files are intact"
            ) from None
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def aside(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


def replace_folder(folder: Path, new: Path) -> None:
    """`new` (a finished folder beside `folder`) takes the place of `folder`, in one step where the system can swap
    two folders. Elsewhere the old folder is moved aside first, and `recover_folder` puts it back if a crash
    falls between the two moves."""
    if not folder.exists():
        os.rename(new, folder)
    elif exchange(new, folder):
        shutil.rmtree(new)  # it holds the old folder now
    else:
        os.rename(folder, aside(folder))
        os.rename(new, folder)
        shutil.rmtree(aside(folder))


def recover_folder(folder: Path) -> None:
    """After a crash in replace_folder: the old folder back where it was, or what is left of it removed."""
    if aside(folder).exists():
        if folder.exists():
            shutil.rmtree(aside(folder))
        else:
            os.rename(aside(folder), folder)


@contextmanager
def made_once(path: Path, what: str):
    """While the block runs, this process alone makes `path` (a file in the cache): another process making it too
    waits here (a second sweep worker), then finds it made. Yields whether it is still to be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(f"{path.stem}.lock"), "w")
    except OSError as error:
        raise UserError(
            f"cannot write {what} into {path.parent}: {error.strerror}; set CARS_CACHE to a folder you may write"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield not path.is_file()
