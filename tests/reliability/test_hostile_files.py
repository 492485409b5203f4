"""Hostile files in an image folder: each is skipped with a reason naming what is wrong, in
bounded memory, without blocking, and the run still indexes everything good around them.

Memory is measured with ``tracemalloc`` (Python allocations: where reading a whole file
into ``bytes`` shows up) rather than RSS, which the rest of a test process disturbs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from reliability.image_files import bomb_png
from reliability.image_files import noise as noise_image
from vkd.indexer import build_index, verify_index
from vkd.indexer.decode import Decoded, decode_batch, decode_file
from vkd.indexer.scan import FileEntry, SkipRecord
from vkd.retrieval.retriever import Retriever

HUGE = 300 * 2**20  # sparse: costs no disk, but reading it whole would cost 300 MB
PEAK_LIMIT = 20 * 2**20


def _sparse(path: Path, head: bytes, size: int = HUGE, tail: bytes = b"") -> Path:
    """``head``, then zeros up to ``size - len(tail)``, then ``tail`` (a hole, not written data)."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size - len(tail))
        handle.seek(0, os.SEEK_END)
        handle.write(tail)
    return path


def _entry(path: Path, root: Path | None = None) -> FileEntry:
    info = path.stat()
    return FileEntry(str(path.relative_to(root)) if root else path.name, str(path), info.st_size, info.st_mtime_ns)


def _peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- bounded memory

def test_a_huge_junk_file_is_skipped_unread(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "x.jpg", b"JUNK" * 1024)
    skipped, peak = _peak(lambda: decode_file(_entry(path)))
    assert isinstance(skipped, SkipRecord) and "not an image" in skipped.reason, skipped
    assert peak < PEAK_LIMIT, peak


def test_a_png_header_with_a_huge_garbage_body_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    header = _png(noise_image(np.random.default_rng(0)))[:33]  # signature + IHDR
    garbage = _sparse(tmp_path / "garbage.png", header + b"\xa5" * 4096)
    # a well-formed chunk of 300 MB: PIL would read (and keep) it whole
    crafted = _sparse(tmp_path / "crafted.png", header + struct.pack(">I", HUGE - 60) + b"vkDx",
                      tail=_chunk(b"IEND", b""))
    for path, words in ((garbage, "png"), (crafted, "metadata exceeds")):
        skipped, peak = _peak(lambda path=path: decode_file(_entry(path)))
        assert isinstance(skipped, SkipRecord) and words in skipped.reason.lower(), skipped
        assert peak < PEAK_LIMIT, (path.name, peak)


def test_a_jpeg_with_huge_metadata_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    good = _jpeg(noise_image(np.random.default_rng(1)))
    segment = b"\xff\xe9" + struct.pack(">H", 65535) + b"\0" * 65533  # APP9, the largest a segment can be
    path = tmp_path / "fat.jpg"
    path.write_bytes(good[:2] + segment * 300 + good[2:])  # 19 MB of metadata PIL would keep
    skipped, peak = _peak(lambda: decode_file(_entry(path)))
    assert isinstance(skipped, SkipRecord) and "metadata" in skipped.reason, skipped
    assert peak < PEAK_LIMIT - path.stat().st_size // 2, peak


def test_a_valid_png_with_huge_trailing_garbage_decodes_and_hashes_the_whole_file(tmp_path: Path) -> None:
    image = noise_image(np.random.default_rng(2))
    path = _sparse(tmp_path / "tail.png", _png(image), tail=b"the end")
    decoded, peak = _peak(lambda: decode_file(_entry(path)))
    assert isinstance(decoded, Decoded), decoded
    assert np.array_equal(np.asarray(decoded.image), np.asarray(image))
    assert decoded.sha256 == _sha256(path)  # the whole file's bytes, streamed
    assert peak < PEAK_LIMIT, peak


def test_the_file_size_guard_comes_first_and_is_plumbed_through_decode_batch(tmp_path: Path) -> None:
    from vkd.data.images import DEFAULT_MAX_PIXELS, default_max_file_bytes

    path = _sparse(tmp_path / "big.png", _png(noise_image(np.random.default_rng(3))), size=20 * 2**20)
    entry = _entry(path)
    skipped, peak = _peak(lambda: decode_file(entry, max_file_bytes=2**20))
    assert isinstance(skipped, SkipRecord) and peak < PEAK_LIMIT
    assert skipped.reason == f"file size {20 * 2**20} bytes exceeds max_file_bytes={2**20}"
    assert skipped.max_pixels is None  # an explicit size bound: a larger max_pixels does not retry it
    batch = {"path": [entry.path], "abspath": [entry.abspath], "size": [entry.size], "mtime": [entry.mtime]}
    assert "max_file_bytes=1048576" in decode_batch(batch, max_file_bytes=2**20)["error"][0]
    assert decode_batch(batch)["error"][0] is None
    # the default bound follows max_pixels: a file too big for any image within the pixel bound
    assert default_max_file_bytes(DEFAULT_MAX_PIXELS) == 8 * DEFAULT_MAX_PIXELS + 16 * 2**20
    derived = decode_file(entry, max_pixels=100_000)  # 8 x 100 000 + 16 MiB < 20 MiB
    assert isinstance(derived, SkipRecord) and "max_file_bytes" in derived.reason
    assert derived.max_pixels == 100_000  # retried when a later run raises max_pixels


def test_decoding_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "y.jpg"
    os.mkfifo(fifo)
    entry = FileEntry("y.jpg", str(fifo), 0, 0)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(decode_file(entry)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # release the blocked open() so the thread can end, then fail
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("decode_file blocked opening a FIFO")
    (skipped,) = outcome
    assert isinstance(skipped, SkipRecord) and "not a regular file (FIFO)" in skipped.reason


# ---------------------------------------------------------------- the catalogue

def _truncated_png(rng: np.random.Generator) -> bytes:
    data = _png(noise_image(rng, 64, 64))
    return data[: len(data) // 2]


def _broken_exif_jpeg(rng: np.random.Generator) -> bytes:
    # an IFD that claims 5 entries and holds one, whose orientation value is out of range
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x63"
    return _jpeg(noise_image(rng), exif=exif)


# bad file -> words its skip reason must hold
BAD = {
    "zero.jpg": "empty file",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "bomb.png": "decompression bomb guard: 20000x20000",
    "thin.png": "aspect ratio 1x300",
    "huge_junk.jpg": "not an image",
    "png_garbage.png": "png",
    "y.jpg": "not a regular file (fifo)",
}
GOOD = ["ok0.png", "ok1.jpg", "gray16.png", "cmyk.jpg", "anim.gif", "broken_exif.jpg", "x.jpg/inside.png"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, Path]:
    """(images folder, index) built over every hostile kind at once."""
    root = tmp_path_factory.mktemp("hostile") / "images"
    root.mkdir()
    rng = np.random.default_rng(7)
    noise_image(rng).save(root / "ok0.png")
    noise_image(rng).save(root / "ok1.jpg")
    Image.fromarray(rng.integers(0, 65536, (32, 40), dtype=np.uint16)).save(root / "gray16.png")
    Image.fromarray(rng.integers(0, 256, (32, 40, 4), dtype=np.uint8), mode="CMYK").save(root / "cmyk.jpg")
    frames = [noise_image(rng).convert("P") for _ in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (root / "broken_exif.jpg").write_bytes(_broken_exif_jpeg(rng))
    (root / "x.jpg").mkdir()  # a directory with an image's name is walked like any other
    noise_image(rng).save(root / "x.jpg" / "inside.png")

    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello, I am not a JPEG")
    full = _jpeg(noise_image(rng, 64, 48))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "truncated.png").write_bytes(_truncated_png(rng))
    bomb_png(root / "bomb.png")
    noise_image(rng, 1, 300).save(root / "thin.png")
    _sparse(root / "huge_junk.jpg", b"JUNK" * 1024)
    _sparse(root / "png_garbage.png", _png(noise_image(rng))[:33] + bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    os.mkfifo(root / "y.jpg")

    out = root.parent / "index"
    finished = threading.Event()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(build_index(root, out, student=str(tiny_clip), device="cpu", workers=2, batch_size=3))
        except BaseException as error:  # handed to the test thread
            outcome.append(error)
        finally:
            finished.set()

    threading.Thread(target=run, daemon=True).start()
    if not finished.wait(timeout=300):
        with contextlib.suppress(OSError):  # unblock a reader stuck on the FIFO
            os.close(os.open(root / "y.jpg", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("indexing blocked (on the FIFO?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return root, out


def test_every_bad_file_is_listed_with_what_is_wrong(hostile: tuple[Path, Path]) -> None:
    _, out = hostile
    skipped = {record["path"]: record["reason"]
               for record in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == set(BAD), skipped
    for name, words in BAD.items():
        assert words in skipped[name].lower(), (name, skipped[name])
    assert "20000x20000 = 400000000 pixels exceeds max_pixels=89478485" in skipped["bomb.png"]


def test_the_good_files_are_searchable_and_the_index_verifies(hostile: tuple[Path, Path]) -> None:
    root, out = hostile
    assert verify_index(out) == []
    retriever = Retriever(out, rerank=False, prefer="torch")
    assert len(retriever.index) == len(GOOD)
    for name in GOOD:
        (top,) = retriever.search(root / name, k=1)
        assert Path(top.path) == root / name and top.score > 0.999, (name, top)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway: nothing to skip")
def test_an_unreadable_file_is_skipped_with_its_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    noise_image(np.random.default_rng(4)).save(path)
    path.chmod(0)
    try:
        skipped = decode_file(_entry(path))
    finally:
        path.chmod(0o644)
    assert isinstance(skipped, SkipRecord) and "unreadable: permission denied" in skipped.reason.lower()
