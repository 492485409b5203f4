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

Formats beyond PIL's core ones (``FORMATS``):

* AVIF: Pillow's own plugin (in its wheels since 11.3; ``vkd[formats]`` asks for such a Pillow);
* HEIC/HEIF (iPhone photos): the ``pillow-heif`` plugin from ``vkd[formats]``, registered the
  first time a file's header says HEIF, so other files never import it;
* camera RAW (``RAW_EXTENSIONS``: CR2, NEF, ARW, DNG, RAF, ...): the largest baseline JPEG
  preview the camera embedded. Those previews are what a camera's screen, Lightroom's grid and
  most photo browsers show: full or near-full size, the camera's own rendering (white balance,
  picture style), and a search over a photo library wants exactly that picture. Developing the
  sensor data would need LibRaw (``rawpy``: a large native dependency) and give a different,
  unstyled picture; vkd reads the preview with a small TIFF/RAF directory walk instead, no
  dependency. A RAW file with no usable preview is skipped, with that reason.

A file whose format needs a plugin this install lacks is refused with a reason naming the
fix (``missing_plugin_reason``): it lands in ``skipped.jsonl`` as "... pip install "vkd[formats]"".

``capture_time`` reads the EXIF capture date (see its docstring for what the number means).

Torch-free (PIL and numpy only): the ONNX backend and the indexer's decode stage import it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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
# HEIF comes from pillow-heif (registered on first need), AVIF from Pillow itself; a format whose
# plugin is absent is skipped in `_identify` and explained by `missing_plugin_reason`.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "DIB", "AVIF", "HEIF")
# Camera RAW files, read through their embedded JPEG preview (`raw_preview`). Chosen by name,
# because their content is a TIFF container that PIL would open as its small first-IFD image.
RAW_EXTENSIONS = frozenset({".cr2", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".raf", ".pef",
                            ".orf", ".rw2", ".erf", ".3fr", ".kdc", ".mef", ".mos", ".iiq", ".srw"})
FORMATS_EXTRA = "vkd[formats]"
# ISO-BMFF brands (bytes 8-12 of the `ftyp` box) of HEIF stills and of AVIF
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})

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
    """An upright RGB image read from a file, with the sha256 of the whole file when asked and
    the EXIF capture time (``capture_time``; None when absent or unreadable)."""

    image: Image.Image
    sha256: str | None
    size: int
    captured: int | None = None


# ---------------------------------------------------------------- EXIF capture time

_EXIF_IFD = 0x8769
_DATE_TAGS = ((0x9003, 0x9011), (0x9004, 0x9012))  # (DateTimeOriginal, OffsetTimeOriginal), Digitized
_DATETIME, _OFFSET_TIME = 0x0132, 0x9010
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")


def parse_exif_datetime(value: Any, offset: Any = None) -> int | None:
    """``"2024:05:01 12:30:00"`` (EXIF's form) → nanoseconds since the epoch, or None.

    The wall-clock time is read as UTC; an EXIF offset (``"+02:00"``) when given turns it into
    the real UTC instant. A blank, zeroed or malformed value (cameras write ``"    :  :  "``
    and ``"0000:00:00 00:00:00"``) gives None rather than an error.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00").strip()
    try:
        # some writers use "-" or "/" in the date part, or a "T"; the layout is the same
        moment = datetime.strptime(text[:19].replace("-", ":").replace("/", ":").replace("T", " "),
                                   "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    if isinstance(offset, bytes):
        offset = offset.decode("ascii", "replace")
    zone = _OFFSET.fullmatch(offset.strip().strip("\x00")) if isinstance(offset, str) else None
    if zone is not None and int(zone.group(2)) <= 14 and int(zone.group(3)) < 60:
        delta = timedelta(hours=int(zone.group(2)), minutes=int(zone.group(3)))
        moment = moment - delta if zone.group(1) == "+" else moment + delta
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def capture_time(image: Image.Image) -> int | None:
    """When the picture was taken, from its EXIF: nanoseconds since 1970-01-01, or None.

    DateTimeOriginal, else DateTimeDigitized, else DateTime (the last one is the file's
    modification by the camera or an editor). EXIF stores a wall-clock time without a zone:
    it is read as if it were UTC, so a photo taken at 23:30 local time stays on its own date
    in a date filter. When the matching offset tag (OffsetTimeOriginal, OffsetTimeDigitized,
    OffsetTime: EXIF 2.31, written by recent phones) is present, the offset is subtracted and
    the value is the real UTC instant. A missing or broken EXIF block or date gives None.
    """
    try:
        exif = image.getexif()
        inner = exif.get_ifd(_EXIF_IFD)
        for date_tag, offset_tag in _DATE_TAGS:
            found = parse_exif_datetime(inner.get(date_tag), inner.get(offset_tag))
            if found is not None:
                return found
        return parse_exif_datetime(exif.get(_DATETIME), inner.get(_OFFSET_TIME))
    except Exception:  # a broken EXIF block must not lose the image, only its date
        return None


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


_heif_lock = threading.Lock()
_heif_tried = False


def _isobmff_brand(prefix: bytes) -> bytes | None:
    """The major brand of an ISO-BMFF file (HEIF, AVIF, MP4), or None for other files."""
    return prefix[8:12] if len(prefix) >= 12 and prefix[4:8] == b"ftyp" else None


def _register_heif() -> None:
    """Register pillow-heif's HEIF opener once, if it is installed (the ``vkd[formats]`` extra)."""
    global _heif_tried
    if _heif_tried:
        return
    with _heif_lock:
        if not _heif_tried:
            try:
                from pillow_heif import register_heif_opener
            except ImportError:
                pass
            else:
                register_heif_opener()
            _heif_tried = True


def missing_plugin_reason(prefix: bytes, available: Any = None) -> str | None:
    """Why a file with these first bytes cannot be read by this install, with the fix; None when
    its format is either not one vkd knows or one whose plugin is here.

    ``available``: the formats PIL can open (default ``Image.OPEN``; a test passes fewer)."""
    available = Image.OPEN if available is None else available
    brand = _isobmff_brand(prefix)
    if brand in HEIF_BRANDS and "HEIF" not in available:
        return (f"HEIC/HEIF image, but the pillow-heif plugin is not installed: pip install "
                f"\"{FORMATS_EXTRA}\"")
    if brand in AVIF_BRANDS and "AVIF" not in available:
        return (f"AVIF image, but this Pillow was built without AVIF support: pip install "
                f"\"{FORMATS_EXTRA}\" (it asks for a Pillow with AVIF)")
    return None


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
    if _isobmff_brand(prefix) in HEIF_BRANDS:
        _register_heif()  # imported only when a HEIF file turns up
    failures = []
    for fmt in FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        if fmt not in Image.OPEN:
            continue  # a PIL built without this codec (WebP, AVIF) or a plugin not installed (HEIF)
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
    missing = missing_plugin_reason(prefix)
    if missing is not None:  # first: a HEIC with the generic "mif1" brand also fails Pillow's AVIF reader
        raise ImageError(missing + (f" ({'; '.join(failures)})" if failures else ""))
    if failures:
        raise ImageError(f"not a readable image: {'; '.join(failures)}")
    raise ImageError(f"not an image: no supported format ({', '.join(FORMATS)}) matches its first bytes")


def _load_handle(handle: IO[bytes], *, max_pixels: int | None, max_aspect: float | None,
                 source: str | None) -> Image.Image:
    """Header, guards, then the pixels of the first frame, as stored (not yet upright or RGB)."""
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
    return image


def _decode_handle(handle: IO[bytes], *, max_pixels: int | None, max_aspect: float | None,
                   source: str | None) -> Image.Image:
    """Header, guards, then pixels of the first frame, upright and in RGB."""
    return to_rgb(upright(_load_handle(handle, max_pixels=max_pixels, max_aspect=max_aspect, source=source)))


# ---------------------------------------------------------------- camera RAW previews

# A preview larger than this is not a preview (full-size previews of 100 Mpx cameras are ~30 MB)
MAX_PREVIEW_BYTES = 64 * 2**20
_MAX_IFDS = 64  # a crafted file can chain IFDs in a loop: walk a bounded number
_BASELINE_SOF = frozenset({0xC0, 0xC1, 0xC2})  # what PIL decodes; DNG's lossless (C3) raw data is not
_RAW_MAGIC = (b"II*\x00", b"MM\x00*", b"IIRO", b"IIU\x00", b"MMOR")  # TIFF, and ORF's and RW2's variants


def is_raw_name(name: str | os.PathLike[str] | bytes) -> bool:
    return os.path.splitext(os.fsdecode(name))[1].lower() in RAW_EXTENSIONS


def _tiff_jpeg_candidates(read_at: Callable[[int, int], bytes], size: int) -> list[tuple[int, int]]:
    """(offset, length) of every embedded JPEG a TIFF-based RAW lists: JPEGInterchangeFormat
    pairs and single-strip JPEG-compressed IFDs, in IFD0's chain, SubIFDs and the EXIF IFD."""
    head = read_at(0, 8)
    if len(head) < 8 or head[:4] not in _RAW_MAGIC:
        return []
    order = "<" if head[:2] == b"II" else ">"
    queue, seen, found = [struct.unpack(order + "I", head[4:8])[0]], set(), []
    while queue and len(seen) < _MAX_IFDS:
        offset = queue.pop(0)
        if not offset or offset in seen or offset + 2 > size:
            continue
        seen.add(offset)
        count = struct.unpack(order + "H", read_at(offset, 2))[0]
        table = read_at(offset + 2, 12 * count + 4)
        if len(table) < 12 * count + 4:
            continue
        tags: dict[int, list[int]] = {}
        for i in range(count):
            tag, kind, n, raw = struct.unpack(order + "HHI4s", table[12 * i:12 * i + 12])
            if kind not in (3, 4, 13) or n == 0 or n > 1024:  # SHORT, LONG, IFD: all the fields read here
                continue
            width = 2 if kind == 3 else 4
            data = raw if width * n <= 4 else read_at(struct.unpack(order + "I", raw)[0], width * n)
            if len(data) < width * n:
                continue
            tags[tag] = list(struct.unpack(order + ("H" if kind == 3 else "I") * n, data[:width * n]))
        queue.append(struct.unpack(order + "I", table[12 * count:12 * count + 4])[0])
        queue.extend(tags.get(0x014A, []))  # SubIFDs: where NEF, ARW and DNG keep previews
        queue.extend(tags.get(_EXIF_IFD, []))
        if 0x0201 in tags and 0x0202 in tags:  # JPEGInterchangeFormat + length
            found.append((tags[0x0201][0], tags[0x0202][0]))
        if tags.get(0x0103, [0])[0] in (6, 7) and len(tags.get(0x0111, [])) == 1 and len(tags.get(0x0117, [])) == 1:
            found.append((tags[0x0111][0], tags[0x0117][0]))  # one JPEG strip (CR2's IFD0, DNG previews)
    return found


def _raf_jpeg_candidates(read_at: Callable[[int, int], bytes]) -> list[tuple[int, int]]:
    """Fujifilm RAF: a fixed header whose bytes 84-91 give the JPEG preview's offset and length."""
    head = read_at(0, 92)
    if not head.startswith(b"FUJIFILMCCD-RAW") or len(head) < 92:
        return []
    offset, length = struct.unpack(">II", head[84:92])
    return [(offset, length)]


def _baseline_jpeg(read_at: Callable[[int, int], bytes], offset: int, length: int) -> bool:
    """Whether the JPEG at ``offset`` is one PIL decodes (baseline or progressive, not lossless)."""
    position, end = offset + 2, offset + length
    if read_at(offset, 2) != b"\xff\xd8":
        return False
    for _ in range(256):
        header = read_at(position, 4)
        if len(header) < 4 or header[0] != 0xFF or position >= end:
            return False
        marker = header[1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a SOFn (not DHT, JPG, DAC)
            return marker in _BASELINE_SOF
        position += 2 + struct.unpack(">H", header[2:])[0]
    return False


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of ``handle`` as a file of their own, read on demand:
    a preview is decoded from the RAW file in place, never copied into memory whole. No
    ``fileno``: positioned reads must go through this window's offsets."""

    def __init__(self, handle: IO[bytes], offset: int, length: int) -> None:
        self._read_at = _reader_at(handle)
        self._offset, self._length, self._position = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._length - self._position))
        data = self._read_at(self._offset + self._position, count) if count else b""
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)


def _preview_window(handle: IO[bytes]) -> tuple[int, int]:
    """(offset, length) of the largest decodable JPEG preview embedded in a camera RAW file.
    Reads only the directories and the previews' first segments."""
    read_at = _reader_at(handle)
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    try:
        candidates = _tiff_jpeg_candidates(read_at, size) + _raf_jpeg_candidates(read_at)
    except (struct.error, OverflowError, ValueError, OSError):
        candidates = []  # a damaged directory: said below as "no preview"
    usable = sorted(((n, o) for o, n in candidates if 0 < n <= MAX_PREVIEW_BYTES and o + n <= size),
                    reverse=True)
    for length, offset in usable:
        if _baseline_jpeg(read_at, offset, length):
            return offset, length
    raise ImageError("camera RAW file without an embedded JPEG preview that vkd can read (vkd indexes "
                     "RAW files through the camera's own preview, not the sensor data)")


def raw_preview(handle: IO[bytes]) -> bytes:
    """The largest decodable JPEG preview embedded in a camera RAW file (CR2, NEF, ARW, DNG,
    ORF, RW2, PEF, RAF ...), as bytes. Reads only the directories and that preview; the
    indexer decodes the preview in place instead (``read_image_file``).

    Raises ``ImageError`` when the file has none (a RAW file from a camera that embeds no
    JPEG preview, or not a RAW file at all).
    """
    offset, length = _preview_window(handle)
    return _reader_at(handle)(offset, length)


def _raw_container_time(handle: IO[bytes]) -> int | None:
    """The RAW container's EXIF capture time, for previews that carry no EXIF of their own."""
    from PIL import TiffImagePlugin

    try:
        handle.seek(0)
        return capture_time(TiffImagePlugin.TiffImageFile(handle))
    except Exception:  # RAF is no TIFF, some makers bend the format: the date is only lost
        return None


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


def _open_regular(path: str | os.PathLike[str], source: str) -> IO[bytes]:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    handle = os.fdopen(fd, "rb")
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        raise ImageError(f"not a regular file ({_file_kind(info.st_mode)})", source=source)
    return handle


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a regular file, streamed in 1 MiB blocks (bounded memory whatever its size)."""
    with _open_regular(path, os.fsdecode(path)) as handle:
        return _stream_sha256(handle)


def read_image_file(path: str | os.PathLike[str], *, max_pixels: int | None = None,
                    max_aspect: float | None = DEFAULT_MAX_ASPECT, max_file_bytes: int | None = None,
                    sha256: bool = False, captured: bool = False) -> ImageFileRead:
    """Read one image file: checks first, then pixels, then (``sha256=True``) the file's hash.

    ``max_pixels=None``: the bound in force (``pixel_bound_in_force``). ``max_file_bytes=None``:
    ``default_max_file_bytes(max_pixels)``. ``captured=True`` also reads the EXIF capture time
    (``capture_time``) from the image already open. A camera RAW file (by its extension,
    ``RAW_EXTENSIONS``) is read through its embedded JPEG preview (``raw_preview``). Raises
    ``ImageError`` (``ImageTooLarge`` for a bound) naming the file, and ``OSError`` when it
    cannot be opened at all.
    """
    source = os.fsdecode(path)
    pixels = pixel_bound_in_force() if max_pixels is None else int(max_pixels)
    size_bound = default_max_file_bytes(pixels) if max_file_bytes is None else int(max_file_bytes)
    with _open_regular(path, source) as handle:
        info = os.fstat(handle.fileno())
        if info.st_size == 0:
            raise ImageError("empty file (0 bytes)", source=source)
        if size_bound is not None and info.st_size > size_bound:
            raise ImageTooLarge(f"file size {info.st_size} bytes exceeds max_file_bytes={size_bound}",
                                limit="max_file_bytes", bound=size_bound, source=source)
        when = None
        if is_raw_name(source):
            try:
                offset, length = _preview_window(handle)
            except ImageError as error:
                raise ImageError(error.reason, source=source) from None
            window = io.BufferedReader(_Window(handle, offset, length))
            stored = _load_handle(window, max_pixels=pixels, max_aspect=max_aspect, source=source)
            if captured:
                when = capture_time(stored)
                when = _raw_container_time(handle) if when is None else when
        else:
            stored = _load_handle(handle, max_pixels=pixels, max_aspect=max_aspect, source=source)
            when = capture_time(stored) if captured else None
        image = to_rgb(upright(stored))
        digest = _stream_sha256(handle) if sha256 else None
    return ImageFileRead(image, digest, info.st_size, when)


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


def thumbnail_data_url(path: str | os.PathLike[str], side: int = 256) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of ``path`` for self-contained HTML pages
    (``vkd search --html``, ``vkd dupes --html``); None when the file cannot be read any more
    (moved or deleted since indexing: the page still lists it)."""
    import base64

    try:
        image = load_image(path)
    except (ImageError, OSError):
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
