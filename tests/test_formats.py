"""More photo formats: HEIC/HEIF (pillow-heif, ``vkd[formats]``), AVIF (Pillow), and camera RAW
files through their embedded JPEG preview."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from vkd.data.images import (
    FORMATS_EXTRA,
    RAW_EXTENSIONS,
    ImageError,
    decode_image_bytes,
    missing_plugin_reason,
    read_image_file,
)
from vkd.indexer import Index, build_index, verify_index
from vkd.indexer.scan import IMAGE_EXTENSIONS
from vkd.models import load_encoder

ORIGINAL = 0x9003


def _picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image, date: str | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if date:
        exif.get_ifd(0x8769)[ORIGINAL] = date
    image.save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def _tiff_raw(previews: list[tuple[bytes, int]], thumbnail: bytes | None = None) -> bytes:
    """A little-endian TIFF container shaped like a camera RAW: IFD0 with a JPEGInterchangeFormat
    thumbnail, and one SubIFD per preview, each a single JPEG strip of the given compression (6 or
    7; DNG keeps its lossless sensor data as compression 7 too)."""
    blobs: list[bytes] = []
    header = 8
    ifd_size = lambda n: 2 + 12 * n + 4  # noqa: E731
    ifd0_entries = 1 + (2 if thumbnail else 0)
    sub_entries = 3
    sub_offsets = [header + ifd_size(ifd0_entries) + 4 * len(previews) + i * ifd_size(sub_entries)
                   for i in range(len(previews))]
    data_at = header + ifd_size(ifd0_entries) + 4 * len(previews) + len(previews) * ifd_size(sub_entries)
    placed = []
    for blob in ([thumbnail] if thumbnail else []) + [p for p, _ in previews]:
        placed.append(data_at)
        blobs.append(blob)
        data_at += len(blob)

    def ifd(entries: list[tuple[int, int, int, int]]) -> bytes:
        out = struct.pack("<H", len(entries))
        for tag, kind, count, value in sorted(entries):
            out += struct.pack("<HHII", tag, kind, count, value)
        return out + struct.pack("<I", 0)

    array_at = header + ifd_size(ifd0_entries)
    ifd0 = [(0x014A, 4, len(previews), array_at if len(previews) > 1 else sub_offsets[0])]
    if thumbnail:
        ifd0 += [(0x0201, 4, 1, placed[0]), (0x0202, 4, 1, len(thumbnail))]
    body = b"II*\x00" + struct.pack("<I", header) + ifd(ifd0) + b"".join(struct.pack("<I", o) for o in sub_offsets)
    first = 1 if thumbnail else 0
    for i, (blob, compression) in enumerate(previews):
        body += ifd([(0x0103, 3, 1, compression), (0x0111, 4, 1, placed[first + i]), (0x0117, 4, 1, len(blob))])
    return body + b"".join(blobs)


def _lossless_jpeg(size: int) -> bytes:
    """Bytes that start like a lossless (SOF3) JPEG, as DNG sensor data does: PIL cannot decode it."""
    sof3 = b"\xff\xc3" + struct.pack(">H", 11) + b"\x10\x00\x10\x00\x10\x01\x01\x11\x00"
    return b"\xff\xd8" + sof3 + b"\x00" * (size - 15)


def test_every_raw_extension_is_listed_by_the_scan() -> None:
    assert RAW_EXTENSIONS <= IMAGE_EXTENSIONS
    assert {".heic", ".heif", ".avif", ".cr2", ".nef", ".arw", ".dng", ".raf"} <= IMAGE_EXTENSIONS


def test_the_skip_reason_for_a_missing_plugin_names_the_extra() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00"
    avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00"
    for prefix, words in ((heic, "pillow-heif"), (avif, "AVIF")):
        reason = missing_plugin_reason(prefix, available={})
        assert reason is not None and words in reason and f'pip install "{FORMATS_EXTRA}"' in reason
        assert missing_plugin_reason(prefix, available={"HEIF": None, "AVIF": None}) is None
    assert missing_plugin_reason(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", available={}) is None
    assert missing_plugin_reason(b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00", available={}) is None  # an MP4


def test_a_raw_file_is_read_from_its_largest_decodable_preview(tmp_path: Path) -> None:
    preview = _picture(1, (96, 80))
    raw = tmp_path / "IMG_0001.CR2"
    raw.write_bytes(_tiff_raw([(_jpeg(_picture(2, (32, 24))), 6), (_jpeg(preview, "2023:03:04 05:06:07"), 7),
                               (_lossless_jpeg(200_000), 7)], thumbnail=_jpeg(_picture(3, (16, 12)))))
    read = read_image_file(raw, captured=True, sha256=True)
    assert read.image.size == (96, 80) and read.captured == 1677906367 * 10**9
    want = decode_image_bytes(_jpeg(preview, "2023:03:04 05:06:07"))
    np.testing.assert_array_equal(np.asarray(read.image), np.asarray(want))
    nothing = tmp_path / "broken.nef"
    nothing.write_bytes(_tiff_raw([(_lossless_jpeg(5000), 7)]))
    with pytest.raises(ImageError, match="without an embedded JPEG preview"):
        read_image_file(nothing)
    fuji = tmp_path / "DSCF0001.RAF"
    jpeg = _jpeg(preview)
    head = b"FUJIFILMCCD-RAW 0201FF383501".ljust(84, b"\0") + struct.pack(">II", 100, len(jpeg))
    fuji.write_bytes(head.ljust(100, b"\0") + jpeg + b"sensor data")
    assert read_image_file(fuji).image.size == (96, 80)


def _heic(image: Image.Image, path: Path, date: str | None = None) -> Path:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    if date:
        exif.get_ifd(0x8769)[ORIGINAL] = date
    image.save(path, format="HEIF", quality=90, exif=exif)
    return path


def test_a_heic_photo_is_read_with_its_capture_date(tmp_path: Path) -> None:
    path = _heic(_picture(5), tmp_path / "IMG_0001.HEIC", "2024:08:09 10:11:12")
    read = read_image_file(path, captured=True)
    assert read.image.mode == "RGB" and read.image.size == (64, 48)
    assert read.captured == 1723198272 * 10**9


def test_heic_avif_and_raw_files_are_indexed_and_searchable(tmp_path: Path, tiny_clip: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    _picture(0).save(root / "plain.png")
    wanted = {"phone.heic": _heic(_picture(1), root / "phone.heic")}
    if features.check("avif"):
        _picture(2).save(root / "web.avif", format="AVIF", quality=90)
        wanted["web.avif"] = root / "web.avif"
    (root / "camera.nef").write_bytes(_tiff_raw([(_jpeg(_picture(3, (96, 80))), 6)]))
    wanted["camera.nef"] = root / "camera.nef"
    (root / "nothing.dng").write_bytes(_tiff_raw([(_lossless_jpeg(5000), 7)]))

    student = load_encoder(tiny_clip, device="cpu")
    out = tmp_path / "idx"
    result = build_index(root, out, student=student)
    assert result.added == 1 + len(wanted), result
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"]
               for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert list(skipped) == ["nothing.dng"] and "JPEG preview" in skipped["nothing.dng"]
    index = Index.open(out)
    assert verify_index(out) == []
    shard = index.shards[0]
    rows = {r["relpath"]: r for r in shard.records(range(shard.rows))}
    assert (rows["camera.nef"]["width"], rows["camera.nef"]["height"]) == (96, 80)
    for name, path in wanted.items():
        query = student.encode_images([path])  # the search path reads the file as the indexer did
        _, found = shard.search(query, 1)
        assert found[0, 0] == rows[name]["row"], name


def test_a_hostile_raw_file_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """A crafted RAW whose "preview" is 30 MB of junk after a JPEG header, and one whose IFDs
    loop: each is refused without the preview being read into memory, and without hanging."""
    import tracemalloc

    real = _jpeg(_picture(4))
    sof = real.index(b"\xff\xc0")
    junk_size = 30 * 2**20  # over the 20 MB bound: reading it whole would show
    raw = tmp_path / "junk.arw"
    with open(raw, "wb") as handle:
        handle.write(_tiff_raw([(real[:sof + 19], 6)]))  # the directory and the JPEG's first segments
    # point the strip's byte count at a sparse 30 MB tail (a hole: no disk used)
    body = bytearray(raw.read_bytes())
    at = body.index(struct.pack("<HHI", 0x0117, 4, 1))
    body[at + 8:at + 12] = struct.pack("<I", junk_size)
    raw.write_bytes(bytes(body))
    with open(raw, "r+b") as handle:
        handle.truncate(len(body) + junk_size)

    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            read_image_file(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak

    looping = tmp_path / "loop.cr2"
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x014A, 4, 1, 8) + struct.pack("<I", 8)  # points at itself
    looping.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd)
    with pytest.raises(ImageError, match="JPEG preview"):
        read_image_file(looping)
