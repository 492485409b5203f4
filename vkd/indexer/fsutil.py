"""Crash-safe file writes and the single-writer lock of an index directory.

Everything the indexer makes visible goes through ``atomic_write``: the bytes land in a
temporary file next to the target, are fsynced, renamed over the target and the directory
is fsynced, so after a crash (kill -9, power loss) a reader sees either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
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
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
