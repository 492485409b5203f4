"""Stage 2 — turn a file into an RGB image the encoder can take, or a reason it cannot.

Decoding is where real photo folders bite: truncated downloads, zero-byte files, text
saved as ``.jpg``, CMYK scans, 16-bit PNGs, palette images with transparency, animated
GIFs, phone photos stored sideways with an EXIF orientation, decompression bombs, huge
junk files and named pipes. Every one of them ends as either an RGB ``PIL.Image`` or a
``SkipRecord`` whose reason goes to ``skipped.jsonl``; nothing here may stop a run.

The conversion itself is ``vkd.data.images`` — the same one queries, training and
evaluation use, so an indexed image and the same image as a query get the same vector.
A file is checked (regular file, size, header, declared pixels) before its bulk is read,
then decoded from the open handle and hashed by streaming it: the sha256 column is the
hash of the whole file, and no file is ever held in memory whole. The EXIF capture date (the
shard's ``captured`` column) is read from the image already open, not from a second read.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vkd.data.images import (
    ALPHA_MODES,
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    WHITE,
    ImageTooLarge,
    decode_image_bytes,
    default_max_file_bytes,
    read_image_file,
    to_rgb,
)
from vkd.data.images import ImageError as DecodeError
from vkd.indexer.scan import FileEntry, SkipRecord

__all__ = [
    "ALPHA_MODES", "DEFAULT_MAX_ASPECT", "DEFAULT_MAX_PIXELS", "WHITE", "DecodeError", "Decoded", "decode_batch",
    "decode_bytes", "decode_file", "default_max_file_bytes", "pixel_guard", "to_rgb",
]


@dataclass
class Decoded:
    """A decoded image and the facts the shard stores about its file."""

    entry: FileEntry
    image: Image.Image
    width: int
    height: int
    sha256: str
    #: EXIF capture time, ns since the epoch (``vkd.data.images.capture_time``); None without one
    captured: int | None = None


@contextlib.contextmanager
def pixel_guard(max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[None]:
    """Make PIL's decompression-bomb check, and the bound ``vkd.data.images`` applies when
    given none (``load_rgb`` in the encoders), use ``max_pixels``; PIL's check fails instead
    of warning.

    PIL reads one global bound and only *warns* below twice that bound; during a run we want
    its check to agree with ours and to raise. This changes process-global state, so enter
    it once from the thread that starts the decode workers, not from each worker.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def decode_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Decode image bytes into an upright RGB image (first frame of animations).

    Raises ``DecodeError`` (``vkd.data.images.ImageError``) saying what is wrong.
    """
    return decode_image_bytes(data, max_pixels=max_pixels, max_aspect=max_aspect)


def decode_file(entry: FileEntry, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect: float = DEFAULT_MAX_ASPECT, max_file_bytes: int | None = None) -> Decoded | SkipRecord:
    """Check, decode and hash one file. Never raises for a bad file: returns a ``SkipRecord``.

    ``max_file_bytes`` bounds the file's size before anything else is read; the default,
    ``default_max_file_bytes(max_pixels)`` (~732 MB for the default ``max_pixels``), is the
    most a file within the pixel bound can need, and grows with ``max_pixels``.
    """
    try:
        read = read_image_file(entry.abspath, max_pixels=max_pixels, max_aspect=max_aspect,
                               max_file_bytes=max_file_bytes, sha256=True, captured=True)
    except FileNotFoundError:
        return SkipRecord(entry.path, "file disappeared during the run", entry.size, entry.mtime)
    except ImageTooLarge as error:
        # recorded so that a later run with a larger max_pixels retries the file; the default
        # size bound grows with max_pixels, so it counts too
        retry = error.limit == "max_pixels" or (error.limit == "max_file_bytes" and max_file_bytes is None)
        return SkipRecord(entry.path, error.reason, entry.size, entry.mtime,
                          max_pixels=max_pixels if retry else None)
    except DecodeError as error:
        return SkipRecord(entry.path, error.reason, entry.size, entry.mtime)
    except OSError as error:
        return SkipRecord(entry.path, f"unreadable: {error.strerror or error}", entry.size, entry.mtime)
    except Exception as error:  # any decoder failure (truncated, corrupt, unsupported mode) is a skip
        return SkipRecord(entry.path, f"cannot decode: {type(error).__name__}: {error}", entry.size,
                          entry.mtime)
    image = read.image
    assert read.sha256 is not None  # asked for above
    return Decoded(entry, image, image.width, image.height, read.sha256, read.captured)


def decode_batch(batch: Mapping[str, Sequence[Any]], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT, max_file_bytes: int | None = None) -> dict[str, list[Any]]:
    """The decode stage over a column batch (``path``, ``abspath``, ``size``, ``mtime``).

    Returns the input columns plus ``image`` (RGB PIL image or None), ``width``, ``height``,
    ``sha256``, ``captured`` and ``error`` (None when decoded). Shaped for Ray Data's ``map_batches``.
    """
    out: dict[str, list[Any]] = {key: [] for key in ("path", "abspath", "size", "mtime", "image",
                                                     "width", "height", "sha256", "captured", "error")}
    with pixel_guard(max_pixels):
        for path, abspath, size, mtime in zip(batch["path"], batch["abspath"], batch["size"],
                                              batch["mtime"], strict=True):
            entry = FileEntry(str(path), str(abspath), int(size), int(mtime))
            result = decode_file(entry, max_pixels=max_pixels, max_aspect=max_aspect,
                                 max_file_bytes=max_file_bytes)
            out["path"].append(entry.path)
            out["abspath"].append(entry.abspath)
            out["size"].append(entry.size)
            out["mtime"].append(entry.mtime)
            if isinstance(result, Decoded):
                values = (result.image, result.width, result.height, result.sha256, result.captured, None)
            else:
                values = (None, None, None, None, None, result.reason)
            for key, value in zip(("image", "width", "height", "sha256", "captured", "error"), values,
                                  strict=True):
                out[key].append(value)
    return out
