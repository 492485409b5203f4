"""The one conversion from an image file or a PIL image to the RGB pixels a model sees.

Indexing (``vkd.indexer.decode``), queries and ``Encoder.encode_images``
(``vkd.models.base.load_rgb``), training, evaluation and the ONNX preprocessing all call
``load_image`` / ``read_image_file`` here, so an image gets the same pixels, and so the
same vector, on every path:

* first frame of an animation, EXIF orientation applied (a broken EXIF block is ignored);
* transparency (alpha, palette or colour-key ``tRNS``) composited on white;
* 16-bit, 32-bit and float grayscale scaled into 8 bits over their full range;
* every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX …) converted by PIL.

Files are checked before their pixels or their bulk are read: the file must be a regular
file no larger than ``max_file_bytes``, its header must identify one of ``FORMATS``, and the
size it declares must pass the pixel (decompression bomb) and aspect-ratio guards. Pixels
are then decoded from the open handle and, when asked, the sha256 of the whole file is
computed by streaming it, so neither a bomb nor a huge junk file is ever held in memory.

Torch-free (PIL and numpy only): the ONNX backend and the indexer's decode stage import it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# PIL's own default bound (~89.5 Mpx, a 0.25 GB RGB image); a photo from a 100 Mpx camera
# needs a larger bound (``--max-pixels`` when indexing).
DEFAULT_MAX_PIXELS = 89_478_485
# An image far thinner than it is long is resized by the encoder's processor so that its
# short side reaches ~224 px: 1 x 100000 px would become 224 x 22 400 000. Treat as a bomb.
DEFAULT_MAX_ASPECT = 100.0
# No supported format stores more than 8 bytes a pixel (16-bit RGBA, or a 64-bit float
# channel, uncompressed), so a file within the pixel bound needs at most 8 bytes per allowed
# pixel, plus room for metadata (EXIF, ICC profiles, XMP, thumbnails).
BYTES_PER_PIXEL_BOUND = 8
METADATA_ALLOWANCE = 16 * 2**20
# PIL reads every PNG chunk and every JPEG segment before the scan whole into memory (and
# keeps the unknown ones): a crafted 200 MB chunk costs 400 MB. Real files carry a few MB at
# most (EXIF, XMP, ICC profiles), so more than this much of it is refused before PIL reads it.
MAX_METADATA_BYTES = METADATA_ALLOWANCE
# The formats the indexer lists by extension (vkd.indexer.scan.IMAGE_EXTENSIONS); PIL's other
# plugins stay out of reach of untrusted files (EPS, for one, runs Ghostscript). MPO (phone
# JPEGs with several pictures) is identified through "JPEG".
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "DIB")

WHITE = (255, 255, 255)
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# modes whose "transparency" info (a palette index or a colour key) PIL turns into alpha
KEYED_MODES = frozenset({"P", "L", "RGB"})
_HASH_BLOCK = 1 << 20


class ImageError(ValueError):
    """A file or image that vkd cannot turn into pixels; the message names it and says why.

    ``reason`` is the message without the name (what ``skipped.jsonl`` records next to the
    path); ``source`` is the file name, or None.
    """

    def __init__(self, reason: str, *, source: str | None = None) -> None:
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


class ImageTooLarge(ImageError):
    """An image over one of the bounds; ``limit`` names it (``max_pixels``, ``max_aspect``
    or ``max_file_bytes``) and ``bound`` is its value."""

    def __init__(self, reason: str, *, limit: str, bound: float, source: str | None = None) -> None:
        self.limit = limit
        self.bound = bound
        super().__init__(reason, source=source)


@dataclass
class ImageFileRead:
    """An upright RGB image read from a file, with the sha256 of the whole file when asked."""

    image: Image.Image
    sha256: str | None
    size: int


def pixel_bound_in_force() -> int | None:
    """The pixel bound used when none is given: PIL's ``Image.MAX_IMAGE_PIXELS``.

    That is PIL's own knob for decompression bombs, ~89.5 Mpx unless changed; an indexing run
    sets it to its ``max_pixels`` (``vkd.indexer.decode.pixel_guard``), and setting it to None
    turns the pixel guard off, as it does for PIL.
    """
    bound = Image.MAX_IMAGE_PIXELS
    return None if bound is None else int(bound)


def default_max_file_bytes(max_pixels: int | None) -> int | None:
    """The file-size bound that goes with a pixel bound (None: no pixel bound, no size bound).

    8 bytes a pixel plus 16 MiB: for the default pixel bound, ~732 MB. A larger file cannot
    be an image within the pixel bound in any supported format, so raising the pixel bound
    raises this one too.
    """
    if max_pixels is None:
        return None
    return int(max_pixels) * BYTES_PER_PIXEL_BOUND + METADATA_ALLOWANCE


def check_dimensions(width: int, height: int, *, max_pixels: int | None = None,
                     max_aspect: float | None = DEFAULT_MAX_ASPECT, source: str | None = None) -> None:
    """Raise ``ImageTooLarge`` / ``ImageError`` when a declared size must not be decoded.

    Called on the header's size, before any pixel is allocated: the point is never to
    allocate a bomb. ``max_pixels=None``: the bound in force (``pixel_bound_in_force``).
    """
    bound = pixel_bound_in_force() if max_pixels is None else int(max_pixels)
    if min(width, height) <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})", source=source)
    if bound is not None and width * height > bound:
        raise ImageTooLarge(
            f"decompression bomb guard: {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels={bound}", limit="max_pixels", bound=bound, source=source)
    if max_aspect is not None and max(width, height) / min(width, height) > max_aspect:
        raise ImageTooLarge(f"aspect ratio {width}x{height} exceeds {max_aspect:g}:1",
                            limit="max_aspect", bound=max_aspect, source=source)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB in 8 bits per channel: transparency composited on white, 16-bit and float scaled.

    Returns ``image`` itself when it is RGB without transparency already.
    """
    mode = image.mode
    if mode in KEYED_MODES and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return image
    if mode in ALPHA_MODES:
        # La (premultiplied) converts only to LA; from there PIL reaches RGBA
        rgba = image.convert("LA").convert("RGBA") if mode == "La" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(image).convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: PIL converts these itself
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


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; itself when there is nothing to turn.

    A broken EXIF block must not lose an otherwise good image, so any failure reading or
    applying it leaves the image as stored.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return image
    if orientation not in range(2, 9):
        return image  # ImageOps.exif_transpose would return a copy: not worth the memory
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _name(source: Any) -> str:
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or "PIL image")
    return os.fsdecode(source) if isinstance(source, (str, bytes, os.PathLike)) else repr(source)


def convert_image(image: Image.Image, *, max_pixels: int | None = None,
                  max_aspect: float | None = DEFAULT_MAX_ASPECT, source: str | None = None) -> Image.Image:
    """An in-memory (or lazily opened) PIL image through the guards and the conversion.

    The current frame is used as it is (whoever passed the image chose it). Returns
    ``image`` itself when it is upright RGB already, so calling this twice costs nothing.
    """
    source = source or _name(image)
    width, height = image.size
    check_dimensions(width, height, max_pixels=max_pixels, max_aspect=max_aspect, source=source)
    try:
        image.load()
    except Exception as error:  # a lazily opened file that is truncated or corrupt
        raise ImageError(f"cannot decode: {type(error).__name__}: {error}", source=source) from None
    return to_rgb(upright(image))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = (b"IDAT", b"fdAT")
# JPEG markers without a length field: RST0-7, SOI, EOI, TEM
_JPEG_STANDALONE = frozenset({*range(0xD0, 0xDA), 0x01})


def _reader_at(handle: IO[bytes]) -> Callable[[int, int], bytes]:
    """``read_at(offset, count)``: positioned reads that leave ``handle``'s position and buffer alone."""
    try:
        fd = handle.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        def read_at(offset: int, count: int) -> bytes:
            handle.seek(offset)
            return handle.read(count)
        return read_at
    return lambda offset, count: os.pread(fd, count, offset)


def _check_metadata(handle: IO[bytes], limit: int = MAX_METADATA_BYTES) -> None:
    """Refuse a PNG or JPEG carrying more than ``limit`` bytes besides its compressed pixels.

    Walks the chunk (segment) headers only, a few bytes each; the data is skipped over. Any
    structure it does not understand is left for PIL to judge: this adds a bound, not a parser.
    """
    read_at = _reader_at(handle)
    magic = read_at(0, 8)
    total = 0
    if magic == PNG_SIGNATURE:
        offset = 8
        while True:
            header = read_at(offset, 8)
            if len(header) < 8:
                return
            length, kind = struct.unpack(">I4s", header)
            if not kind.isalpha():
                return  # not a chunk type: a broken file, which PIL reports as such
            total += 12 if kind in _PNG_PIXEL_CHUNKS else 12 + length  # length, type and CRC fields
            if total > limit:
                raise ImageError(f"PNG metadata exceeds {limit} bytes (chunk {kind!r} of {length} bytes at "
                                 f"offset {offset}): refused before reading it")
            if kind == b"IEND":
                return
            offset += 12 + length
    elif magic[:2] == b"\xff\xd8":
        offset = 2
        while True:
            header = read_at(offset, 4)
            if len(header) < 2 or header[0] != 0xFF:
                return
            marker = header[1]
            if marker == 0xFF or marker in _JPEG_STANDALONE:  # a fill byte, or no length to skip
                offset += 1 if marker == 0xFF else 2
                continue
            if marker == 0xDA or len(header) < 4:  # start of scan: the pixels follow
                return
            length = struct.unpack(">H", header[2:])[0]
            total += 2 + length
            if total > limit:
                raise ImageError(f"JPEG metadata before the image data exceeds {limit} bytes: refused "
                                 "before reading it")
            offset += 2 + length


def _identify(handle: IO[bytes]) -> ImageFile.ImageFile:
    """Open the image in ``handle`` by its header, as ``Image.open`` does, but without PIL's
    own decompression-bomb check.

    That check reads the process-global ``Image.MAX_IMAGE_PIXELS`` and raises (or only warns,
    below twice the bound) before telling us the size; ``check_dimensions`` applies the
    per-call bound instead and can name the size it refuses.
    """
    Image.preinit()
    handle.seek(0)
    prefix = handle.read(16)
    if not prefix:
        raise ImageError("empty file (0 bytes)")
    failures = []
    for fmt in FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        if fmt not in Image.OPEN:
            continue  # a PIL built without this codec (WebP)
        factory, accept = Image.OPEN[fmt]
        try:
            verdict = accept(prefix) if accept is not None else True
        except Exception:  # PIL's checks unpack fixed-size fields: a 1-byte file breaks some
            continue
        if isinstance(verdict, str):
            failures.append(f"{fmt}: {verdict}")
            continue
        if not verdict:
            continue
        handle.seek(0)
        try:
            return factory(handle, "")
        except Exception as error:  # from an untrusted file, any failure means this reader cannot open it
            failures.append(f"{fmt} header, but {type(error).__name__}: {error}")
    if failures:
        raise ImageError(f"not a readable image: {'; '.join(failures)}")
    raise ImageError(f"not an image: no supported format ({', '.join(FORMATS)}) matches its first bytes")


def _decode_handle(handle: IO[bytes], *, max_pixels: int | None, max_aspect: float | None,
                   source: str | None) -> Image.Image:
    """Header, guards, then pixels of the first frame, upright and in RGB."""
    try:
        _check_metadata(handle)
        image = _identify(handle)
    except ImageError as error:
        raise ImageError(error.reason, source=source) from None
    width, height = image.size
    check_dimensions(width, height, max_pixels=max_pixels, max_aspect=max_aspect, source=source)
    try:
        image.seek(0)
        image.load()
    except Exception as error:  # truncated data, a corrupt stream, a mode the codec lacks
        raise ImageError(f"cannot decode: {type(error).__name__}: {error}", source=source) from None
    # no `with image:` — closing a PIL image destroys its pixels; the caller closes the handle
    return to_rgb(upright(image))


def decode_image_bytes(data: bytes, *, max_pixels: int | None = None,
                       max_aspect: float | None = DEFAULT_MAX_ASPECT, source: str | None = None) -> Image.Image:
    """``data`` (a whole image file already in memory) through the guards and the conversion."""
    return _decode_handle(io.BytesIO(data), max_pixels=max_pixels, max_aspect=max_aspect, source=source)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "unknown kind"


def _stream_sha256(handle: IO[bytes]) -> str:
    """sha256 of the whole file, read in 1 MiB blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    handle.seek(0)
    while True:
        count = handle.readinto(view)  # type: ignore[attr-defined]
        if not count:
            return digest.hexdigest()
        digest.update(view[:count])


def read_image_file(path: str | os.PathLike[str], *, max_pixels: int | None = None,
                    max_aspect: float | None = DEFAULT_MAX_ASPECT, max_file_bytes: int | None = None,
                    sha256: bool = False) -> ImageFileRead:
    """Read one image file: checks first, then pixels, then (``sha256=True``) the file's hash.

    ``max_pixels=None``: the bound in force (``pixel_bound_in_force``). ``max_file_bytes=None``:
    ``default_max_file_bytes(max_pixels)``. Raises ``ImageError`` (``ImageTooLarge`` for a
    bound) naming the file, and ``OSError`` when it cannot be opened at all.
    """
    source = os.fsdecode(path)
    pixels = pixel_bound_in_force() if max_pixels is None else int(max_pixels)
    size_bound = default_max_file_bytes(pixels) if max_file_bytes is None else int(max_file_bytes)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"not a regular file ({_file_kind(info.st_mode)})", source=source)
        if info.st_size == 0:
            raise ImageError("empty file (0 bytes)", source=source)
        if size_bound is not None and info.st_size > size_bound:
            raise ImageTooLarge(f"file size {info.st_size} bytes exceeds max_file_bytes={size_bound}",
                                limit="max_file_bytes", bound=size_bound, source=source)
        image = _decode_handle(handle, max_pixels=pixels, max_aspect=max_aspect, source=source)
        digest = _stream_sha256(handle) if sha256 else None
    return ImageFileRead(image, digest, info.st_size)


def load_image(source: Any, *, max_pixels: int | None = None, max_aspect: float | None = DEFAULT_MAX_ASPECT,
               max_file_bytes: int | None = None) -> Image.Image:
    """An upright RGB PIL image from a PIL image or a path, through the guards.

    ``max_pixels=None``: the bound in force (PIL's ``Image.MAX_IMAGE_PIXELS``, ~89.5 Mpx by
    default). Raises ``ImageError`` (a ``ValueError``; ``ImageTooLarge`` for a bound) naming
    the file and what is wrong with it.
    """
    if isinstance(source, Image.Image):
        return convert_image(source, max_pixels=max_pixels, max_aspect=max_aspect)
    if isinstance(source, (str, bytes, os.PathLike)):
        return read_image_file(source, max_pixels=max_pixels, max_aspect=max_aspect,
                               max_file_bytes=max_file_bytes).image
    raise TypeError(f"expected a PIL image or a path, got {type(source).__name__}")
