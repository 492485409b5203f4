"""Stage 2 — turn a file into an RGB image the encoder can take, or a reason it cannot.

Decoding is where real photo folders bite: truncated downloads, zero-byte files, text
saved as ``.jpg``, CMYK scans, 16-bit PNGs, palette images with transparency, animated
GIFs, phone photos stored sideways with an EXIF orientation, and decompression bombs.
Every one of them ends as either an RGB ``PIL.Image`` or a ``DecodeError`` whose message
goes to ``skipped.jsonl``; nothing here may stop a run.

The file is read once: the same bytes give the sha256 column and the decoded image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from vkd.indexer.scan import FileEntry, SkipRecord

# PIL's own default bound (~89.5 Mpx, a 0.25 GB RGB image); a photo from a 100 Mpx camera
# needs a larger --max-pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# An image far thinner than it is long is resized by the encoder's processor so that its
# short side reaches ~224 px: 1 x 100000 px would become 224 x 22 400 000. Treat as a bomb.
DEFAULT_MAX_ASPECT = 100.0

WHITE = (255, 255, 255)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class DecodeError(Exception):
    """The file is not an image this indexer can use; the message says why."""


@dataclass
class Decoded:
    """A decoded image and the facts the shard stores about its file."""

    entry: FileEntry
    image: Image.Image
    width: int
    height: int
    sha256: str


@contextlib.contextmanager
def pixel_guard(max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[None]:
    """Make PIL's decompression-bomb check use ``max_pixels`` and fail instead of warn.

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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB in 8 bits per channel: transparency composited on white, 16-bit and float scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(image).convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL converts these itself
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits (I;16*, I, F) into L, keeping the full range visible."""
    values = np.asarray(image)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float64))
        top = float(values.max()) if values.size else 0.0
        scaled = values * 255.0 if top <= 1.0 else values
    else:
        top = int(values.max()) if values.size else 0
        if image.mode.startswith("I;16") or 255 < top <= 65535:
            scaled = values.astype(np.float64) / 257.0  # 65535 -> 255
        elif top > 65535:
            scaled = values.astype(np.float64) * (255.0 / top)
        else:
            scaled = values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def decode_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Decode image bytes into an upright RGB image (first frame of animations)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image: no known image format matches its content") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError(f"decompression bomb guard: {error}") from None
    with image:
        width, height = image.size
        # checked before pixels are decoded: the point is to never allocate a bomb
        if width * height > max_pixels:
            raise DecodeError(f"decompression bomb guard: {width}x{height} = {width * height} pixels "
                              f"exceeds max_pixels={max_pixels}")
        if min(width, height) <= 0:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        if max(width, height) / min(width, height) > max_aspect:
            raise DecodeError(f"aspect ratio {width}x{height} exceeds {max_aspect:g}:1")
        image.seek(0)
        image.load()
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block should not lose an otherwise good image
            upright = image
        rgb = to_rgb(upright)
        if rgb is image:
            rgb = image.copy()  # detach from the file object that the `with` closes
        rgb.load()
        return rgb


def decode_file(entry: FileEntry, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect: float = DEFAULT_MAX_ASPECT) -> Decoded | SkipRecord:
    """Read, hash and decode one file. Never raises for a bad file: returns a ``SkipRecord``."""
    try:
        with open(entry.abspath, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return SkipRecord(entry.path, "file disappeared during the run", entry.size, entry.mtime)
    except OSError as error:
        return SkipRecord(entry.path, f"unreadable: {error.strerror or error}", entry.size, entry.mtime)
    try:
        image = decode_bytes(data, max_pixels=max_pixels, max_aspect=max_aspect)
    except DecodeError as error:
        bound = max_pixels if "decompression bomb" in str(error) else None
        return SkipRecord(entry.path, str(error), entry.size, entry.mtime, max_pixels=bound)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return SkipRecord(entry.path, f"decompression bomb guard: {error}", entry.size, entry.mtime,
                          max_pixels=max_pixels)
    except Exception as error:  # any decoder failure (truncated, corrupt, unsupported mode) is a skip
        return SkipRecord(entry.path, f"cannot decode: {type(error).__name__}: {error}", entry.size,
                          entry.mtime)
    return Decoded(entry, image, image.width, image.height, hashlib.sha256(data).hexdigest())


def decode_batch(batch: Mapping[str, Sequence[Any]], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> dict[str, list[Any]]:
    """The decode stage over a column batch (``path``, ``abspath``, ``size``, ``mtime``).

    Returns the input columns plus ``image`` (RGB PIL image or None), ``width``, ``height``,
    ``sha256`` and ``error`` (None when decoded). Shaped for Ray Data's ``map_batches``.
    """
    out: dict[str, list[Any]] = {key: [] for key in ("path", "abspath", "size", "mtime", "image",
                                                     "width", "height", "sha256", "error")}
    with pixel_guard(max_pixels):
        for path, abspath, size, mtime in zip(batch["path"], batch["abspath"], batch["size"],
                                              batch["mtime"], strict=True):
            entry = FileEntry(str(path), str(abspath), int(size), int(mtime))
            result = decode_file(entry, max_pixels=max_pixels, max_aspect=max_aspect)
            out["path"].append(entry.path)
            out["abspath"].append(entry.abspath)
            out["size"].append(entry.size)
            out["mtime"].append(entry.mtime)
            if isinstance(result, Decoded):
                values = (result.image, result.width, result.height, result.sha256, None)
            else:
                values = (None, None, None, None, result.reason)
            for key, value in zip(("image", "width", "height", "sha256", "error"), values, strict=True):
                out[key].append(value)
    return out
