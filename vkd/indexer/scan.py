"""Stage 1 — list the image files under a folder.

The walk follows symlinks inside the folder (photo libraries are often assembled from links)
but remembers the real path of every directory it entered, so a link back to a parent, or
two links to one folder, are walked once and a symlink loop cannot hang it. A link whose
target resolves outside the folder is skipped and listed unless ``follow_links`` is set:
indexing a folder should not silently pull in (and later show) files from elsewhere.
Entries whose name starts with "." are left out (``.git``, ``.DS_Store``, macOS ``._``
resource forks). Files are chosen by extension; the content decides the format later, so a
PNG named ``.jpg`` still indexes and a text file named ``.jpg`` is skipped at decode time.
Only regular files become entries: a FIFO, device or socket with an image name (or a link
to one, such as ``x.jpg -> /dev/zero``) is listed as skipped and never opened, since reading
a FIFO blocks and reading ``/dev/zero`` never ends.

Names are kept as the operating system gives them. A relative path is a ``str`` in
``os.fsdecode`` form: a name that is not valid UTF-8 (``caf\\xe9.png`` from a Latin-1
system) holds surrogate escapes (``"caf\\udce9.png"``), opens with ``open()`` and maps back
to its exact bytes with ``os.fsencode``. Where such a name is written down for other
programs (the shard's ``path`` column, ``skipped.jsonl``) it is stored as valid UTF-8 text
with each undecodable byte spelled ``\\xNN``, next to the exact bytes (``stored_path``).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# HEIC/HEIF and AVIF need the vkd[formats] extra (without it they are listed in skipped.jsonl
# with that fix); RAW files are read through their embedded JPEG preview. The RAW names are
# vkd.data.images.RAW_EXTENSIONS, repeated here so that listing files does not import PIL.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
                              ".tif", ".tiff", ".heic", ".heif", ".hif", ".avif",
                              ".cr2", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".pef",
                              ".orf", ".rw2", ".erf", ".3fr", ".kdc", ".mef", ".mos", ".iiq", ".srw"})
OUTSIDE_REASON = "symbolic link leads outside IMAGES_DIR (pass --follow-links to index it)"
BROKEN_LINK_REASON = "broken or looping symlink"
# the str of a UTF-8 name is the name itself only when Python decodes file names as UTF-8
# (its default since 3.7); otherwise it is re-derived from the bytes
_FS_UTF8 = codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def stored_path(path: str) -> tuple[str, bytes | None]:
    """``path`` (os.fsdecode form) as (valid UTF-8 text, exact bytes or None when the text is exact).

    The text spells each byte that is not UTF-8 as ``\\xNN`` (``bytes.decode`` with
    ``backslashreplace``): readable, but two names can share it, so the bytes are kept too.
    """
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def path_from_stored(text: str, raw: bytes | None = None) -> str:
    """The path (os.fsdecode form, it opens the file) from what ``stored_path`` gave."""
    if raw is not None:
        return os.fsdecode(raw)
    if _FS_UTF8:
        return text
    # surrogateescape: skip records written before path_base64 existed hold such names this way
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class FileEntry:
    """One candidate image: ``path`` is relative to the images root, in POSIX form (os.fsdecode
    form: a name that is not UTF-8 carries surrogate escapes)."""

    path: str
    abspath: str
    size: int
    mtime: int  # st_mtime_ns

    @property
    def id(self) -> str:
        return file_id(self.path)


@dataclass(frozen=True)
class SkipRecord:
    """A file that is not in the index, and why (one line of ``skipped.jsonl``).

    On disk ``path`` is valid UTF-8 text (see ``stored_path``); a name that is not UTF-8 also
    carries ``path_base64``, its exact bytes, which ``from_json`` prefers.
    """

    path: str
    reason: str
    size: int | None = None
    mtime: int | None = None
    #: the pixel bound in force when the file was rejected for its size (a larger bound retries it)
    max_pixels: int | None = None

    def to_json(self) -> dict[str, Any]:
        text, raw = stored_path(self.path)
        # a reason may quote the file's name (decoder messages): keep the line valid UTF-8
        reason = _utf8_text(self.reason)
        record: dict[str, Any] = {"path": text, "reason": reason, "size": self.size, "mtime": self.mtime}
        if raw is not None:
            record["path_base64"] = base64.b64encode(raw).decode("ascii")
        if self.max_pixels is not None:
            record["max_pixels"] = self.max_pixels
        return record

    @classmethod
    def from_json(cls, record: Any) -> SkipRecord:
        """Raises ``ValueError``, ``KeyError`` or ``TypeError`` for a record not in this shape."""
        path, reason, encoded = record["path"], record["reason"], record.get("path_base64")
        if not isinstance(path, str) or not isinstance(reason, str):
            raise TypeError(f"path and reason must be strings: {record!r:.100}")
        for key in ("size", "mtime", "max_pixels"):
            value = record.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{key} must be an integer: {record!r:.100}")
        raw = None
        if encoded is not None:
            if not isinstance(encoded, str):
                raise TypeError(f"path_base64 must be a string: {record!r:.100}")
            raw = base64.b64decode(encoded, validate=True)  # binascii.Error is a ValueError
        path = path_from_stored(path, raw)
        os.fsencode(path)  # UnicodeEncodeError (a ValueError) for a name no file system can have
        return cls(path=path, reason=reason, size=record.get("size"),
                   mtime=record.get("mtime"), max_pixels=record.get("max_pixels"))


def _utf8_text(text: str) -> str:
    """``text`` with surrogate escapes spelled ``\\xNN`` (other lone surrogates ``\\uNNNN``)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def file_id(relative_path: str) -> str:
    """Stable row id: sha256 (128 bits) of the relative path's exact bytes.

    A UTF-8 name hashes its UTF-8 encoding, as ids always have; a name that is not UTF-8
    hashes its own bytes (``os.fsencode``; on POSIX ``encode("utf-8", "surrogateescape")``),
    so distinct names never share an id even when their readable forms coincide.
    """
    return hashlib.sha256(os.fsencode(relative_path)).hexdigest()[:32]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def scan_images(root: str | os.PathLike[str], *, exclude: list[Path] | tuple[Path, ...] = (),
                follow_links: bool = False) -> tuple[list[FileEntry], list[SkipRecord]]:
    """All image files under ``root`` (sorted by relative path) and the ones that cannot be read.

    ``exclude`` lists directories to leave out (the index itself when it lives inside the
    images folder). ``follow_links``: also follow symlinks (to files or folders) whose target
    resolves outside ``root``; without it they are listed with ``OUTSIDE_REASON``. Unreadable
    directories, broken and looping symlinks and image-named files that are not regular files
    are reported as ``SkipRecord``s rather than raised; nothing here opens a file.
    """
    root_path = Path(root)
    root_real = os.path.realpath(root_path)
    excluded = {os.path.realpath(p) for p in exclude}
    visited = {root_real}
    entries: list[FileEntry] = []
    skipped: list[SkipRecord] = []
    stack: list[tuple[str, str]] = [(str(root_path), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except OSError as error:
            skipped.append(SkipRecord(prefix or ".", f"directory not readable: {error.strerror or error}"))
            continue
        subdirs = []
        for child in children:
            if child.name.startswith("."):
                continue
            rel = f"{prefix}{child.name}"
            image_name = is_image_name(child.name)
            is_link = False
            try:
                is_link = child.is_symlink()
                # a plain file that is not an image needs no stat: the d_type check says so
                if not image_name and not child.is_dir():
                    continue
                info = child.stat()  # follows links
            except OSError as error:
                if image_name:
                    skipped.append(SkipRecord(rel, BROKEN_LINK_REASON if is_link and isinstance(error, FileNotFoundError)
                                              else f"cannot stat: {error.strerror or error}"))
                continue
            is_dir = stat.S_ISDIR(info.st_mode)
            if not is_dir and not stat.S_ISREG(info.st_mode):
                # said before the outside-link check: following a link to /dev/zero would not help
                skipped.append(SkipRecord(rel, f"not a regular file ({_kind(info.st_mode)})"))
                continue
            if is_link and not follow_links and not _inside(os.path.realpath(child.path), root_real):
                skipped.append(SkipRecord(rel, OUTSIDE_REASON))
                continue
            if is_dir:
                real = os.path.realpath(child.path)
                if real in visited or real in excluded:
                    continue  # already walked (a symlink loop or a second link to one folder)
                visited.add(real)
                subdirs.append((child.path, f"{rel}/"))
            else:
                entries.append(FileEntry(rel, child.path, info.st_size, info.st_mtime_ns))
        # reversed so that popping from the stack walks directories in name order
        stack.extend(reversed(subdirs))
    entries.sort(key=lambda e: e.path)
    skipped.sort(key=lambda s: s.path)
    return entries, skipped
