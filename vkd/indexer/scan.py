"""Stage 1 — list the image files under a folder.

The walk follows directory symlinks (photo libraries are often assembled from links) but
remembers the real path of every directory it entered, so a link back to a parent, or two
links to one folder, are walked once and a symlink loop cannot hang it. Entries whose
name starts with "." are left out (``.git``, ``.DS_Store``, macOS ``._`` resource forks).
Files are chosen by extension; the content decides the format later, so a PNG named
``.jpg`` still indexes and a text file named ``.jpg`` is skipped at decode time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
                              ".tif", ".tiff"})


@dataclass(frozen=True)
class FileEntry:
    """One candidate image: ``path`` is relative to the images root, in POSIX form."""

    path: str
    abspath: str
    size: int
    mtime: int  # st_mtime_ns

    @property
    def id(self) -> str:
        return file_id(self.path)


@dataclass(frozen=True)
class SkipRecord:
    """A file that is not in the index, and why (one line of ``skipped.jsonl``)."""

    path: str
    reason: str
    size: int | None = None
    mtime: int | None = None
    #: the pixel bound in force when the file was rejected for its size (a larger bound retries it)
    max_pixels: int | None = None

    def to_json(self) -> dict:
        record = {"path": self.path, "reason": self.reason, "size": self.size, "mtime": self.mtime}
        if self.max_pixels is not None:
            record["max_pixels"] = self.max_pixels
        return record

    @classmethod
    def from_json(cls, record: dict) -> SkipRecord:
        return cls(path=record["path"], reason=record["reason"], size=record.get("size"),
                   mtime=record.get("mtime"), max_pixels=record.get("max_pixels"))


def file_id(relative_path: str) -> str:
    """Stable row id: the same relative path always gets the same id (128 bits of sha256)."""
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:32]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike[str], *, exclude: list[Path] | tuple[Path, ...] = ()
                ) -> tuple[list[FileEntry], list[SkipRecord]]:
    """All image files under ``root`` (sorted by relative path) and the ones that cannot be read.

    ``exclude`` lists directories to leave out (the index itself when it lives inside the
    images folder). Unreadable directories, broken and looping file symlinks are reported
    as ``SkipRecord``s rather than raised.
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
            try:
                is_dir = child.is_dir()  # follows symlinks
                is_file = not is_dir and child.is_file()
            except OSError as error:
                if is_image_name(child.name):
                    skipped.append(SkipRecord(rel, f"cannot stat: {error.strerror or error}"))
                continue
            if is_dir:
                real = os.path.realpath(child.path)
                if real in visited or real in excluded:
                    continue  # already walked (a symlink loop or a second link to one folder)
                visited.add(real)
                subdirs.append((child.path, f"{rel}/"))
            elif is_file:
                if not is_image_name(child.name):
                    continue
                try:
                    stat = child.stat()
                except OSError as error:
                    skipped.append(SkipRecord(rel, f"cannot stat: {error.strerror or error}"))
                    continue
                entries.append(FileEntry(rel, child.path, stat.st_size, stat.st_mtime_ns))
            elif child.is_symlink() and is_image_name(child.name):
                skipped.append(SkipRecord(rel, "broken or looping symlink"))
        # reversed so that popping from the stack walks directories in name order
        stack.extend(reversed(subdirs))
    entries.sort(key=lambda e: e.path)
    skipped.sort(key=lambda s: s.path)
    return entries, skipped
