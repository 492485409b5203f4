"""The image files behind ``/images/{id}`` and ``/thumbs/{id}``, and uploaded query images.

A file is reached only through an index row: the request names an id, the row names the
path relative to the images folder, and the path is resolved (symbolic links included) and
must stay inside that folder. The indexer skips links out of the folder unless
``--follow-links``, but a row made with it, or a link swapped in later, must not turn the
server into a reader of arbitrary files, so the check is made on every request.

Thumbnails are made once with the conversion every other path uses (EXIF orientation,
transparency on white) and kept on disk, written to a temporary name and renamed so a
reader never sees half of one; where the cache folder cannot be written (a read-only index
mount), they are kept in a bounded in-memory cache instead.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import mimetypes
import os
import re
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("uvicorn.error.vkd")

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
JPEG_QUALITY = 85
CHUNK = 256 * 1024
# Errors that mean "this cache folder cannot be written", not "this thumbnail failed".
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


class NotServable(Exception):
    """A row whose file cannot be served; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def is_image_id(value: str) -> bool:
    """Ids are the indexer's 32 lowercase hex characters; nothing else is looked up."""
    return ID_PATTERN.fullmatch(value) is not None


def display_path(relpath: str) -> str:
    """A row's relative path as JSON-safe text: a byte that is not UTF-8 (held as a lone
    surrogate by ``os.fsdecode``) is spelled ``\\xNN``, as in the Arrow ``path`` column."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def resolve_inside(root: str | os.PathLike[str], relpath: str) -> str:
    """The real path of ``root/relpath``, or ``NotServable`` when it leaves ``root``.

    Both sides are resolved, so a link inside the folder that leads out of it is refused
    just like a ``..`` in the stored path would be.
    """
    root_real = os.path.realpath(root)
    parts = relpath.split("/")
    if not relpath or os.path.isabs(relpath) or any(part in ("", ".", "..") for part in parts):
        raise NotServable(403, "this row's path is not a plain relative path inside the images folder")
    real = os.path.realpath(os.path.join(root_real, *parts))
    if not real.startswith(root_real.rstrip(os.sep) + os.sep):
        raise NotServable(403, "this image's file resolves outside the images folder (a symbolic link out of "
                               "it); the server does not serve it")
    return real


def open_inside(root: str | os.PathLike[str], relpath: str) -> BinaryIO:
    """An open handle on the regular file ``root/relpath`` (see ``resolve_inside``)."""
    real = resolve_inside(root, relpath)
    # O_NOFOLLOW: a link swapped in after the check is refused rather than followed;
    # O_NONBLOCK: a FIFO put in the file's place must not hang the request.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise NotServable(404, "this image's file is no longer in the images folder; re-run `vkd index` "
                               "on the folder") from None
    except OSError as error:
        raise NotServable(403, f"this image's file cannot be opened ({error.strerror or error})") from None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise NotServable(403, "this image's path is not a regular file")
    return handle


_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
         "TIFF": "image/tiff", "BMP": "image/bmp", "DIB": "image/bmp"}
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def content_type(handle: BinaryIO, name: str) -> str:
    """The media type of an image file from its first bytes (the name can lie), else its name."""
    head = os.pread(handle.fileno(), 16, 0)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _MIME["WEBP"]
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return _MIME[fmt]
    guessed, _ = mimetypes.guess_type(name)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def iter_file(handle: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in chunks, closing it at the end (or when the client goes away)."""
    try:
        while chunk := handle.read(CHUNK):
            yield chunk
    finally:
        handle.close()


def make_thumbnail(data: bytes, size: int, *, max_pixels: int | None) -> bytes:
    """A JPEG whose longest side is at most ``size``, upright, transparency on white."""
    from PIL import Image

    from vkd.data.images import decode_image_bytes

    image = decode_image_bytes(data, max_pixels=max_pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _looks_whole(data: bytes) -> bool:
    # Cache files are renamed into place but not fsynced (a thumbnail is cheap to redo), so
    # after a power loss one may be empty or cut: such a file is made again, never served.
    return len(data) > 4 and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


@dataclass
class ThumbCache:
    """Thumbnails on disk under ``directory``, or in memory when it cannot be written.

    Names carry the image's content hash and the size, so a re-indexed, changed image gets
    a new thumbnail and an old one is never served for it; the folder can be deleted at any
    time.
    """

    directory: Path
    memory_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        self.disk = True
        self.disk_error: str | None = None
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.jpg"

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
                return data
        if not self.disk:
            return None
        try:
            data = self.path(key).read_bytes()
        except OSError:
            return None
        return data if _looks_whole(data) else None

    def put(self, key: str, data: bytes) -> None:
        if self.disk:
            try:
                self._write(self.path(key), data)
                return
            except OSError as error:
                if error.errno not in _READ_ONLY:
                    log.warning("thumbnail cache %s: %s; keeping this one in memory", self.directory, error)
                else:
                    self.disk = False
                    self.disk_error = f"{error.strerror or error} ({error.filename or self.directory})"
                    log.warning("thumbnail cache %s cannot be written (%s): thumbnails are kept in memory "
                                "(up to %d MiB); give --thumb-cache DIR on a writable disk to keep them",
                                self.directory, self.disk_error, self.memory_bytes // 2**20)
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = data
            self._memory_used += len(data)
            while self._memory_used > self.memory_bytes and self._memory:
                _, dropped = self._memory.popitem(last=False)
                self._memory_used -= len(dropped)

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {"dir": str(self.directory), "on_disk": self.disk, "disk_error": self.disk_error,
                    "in_memory": len(self._memory), "in_memory_bytes": self._memory_used}
