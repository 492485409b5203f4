"""Crash-safe file writes and the single-writer lock of an index directory.

Everything the indexer makes visible goes through ``atomic_write``: the bytes land in a
temporary file next to the target, are fsynced, renamed over the target and the directory
is fsynced, so after a crash (kill -9, power loss) a reader sees either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_MARKER = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path_for(target: Path) -> Path:
    # pid in the name: two processes never share a temporary; leftovers are recognisable
    return target.with_name(f"{target.name}{TMP_MARKER}{os.getpid()}")


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file, then atomically replace ``target`` with it."""
    tmp = tmp_path_for(target)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError) and error.errno is not None:
            # name the file being written, not the temporary (a failed write() names none)
            raise OSError(error.errno, error.strerror, str(target)) from error
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: Path, data: bytes | memoryview) -> None:
    atomic_write(target, lambda handle: handle.write(data))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_FIXES = {
    errno.ENOSPC: "free some space on that disk, or write the index elsewhere with --out",
    errno.EDQUOT: "your disk quota is used up: free some space, or write the index elsewhere with --out",
    errno.EROFS: "that file system is read-only: write the index elsewhere with --out",
    errno.EACCES: "you may not write there: fix its permissions, or write the index elsewhere with --out",
    errno.EPERM: "you may not write there: fix its permissions, or write the index elsewhere with --out",
}


def describe_os_error(error: OSError) -> str:
    """One line for a failed file operation: the path, the cause and what to do about it."""
    where = error.filename if error.filename is not None else "a file"
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    cause = error.strerror or str(error)
    fix = _FIXES.get(error.errno or 0)
    return f"{where}: {cause}" + (f"; {fix}" if fix else "") + ". The index as last committed is unchanged."


class IndexLockedError(RuntimeError):
    pass


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` while writing the index.

    The kernel drops an flock when its process dies, so a killed run never leaves the
    index locked. Readers take no lock: they read a committed manifest.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a single writer is then the user's job
        yield
        return
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise IndexLockedError(
                f"{directory}: another vkd run is writing this index (pid {holder}); wait for it "
                "to finish, or write to another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
