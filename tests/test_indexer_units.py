"""Indexer parts that need no model: index choice, FAISS search, decoding, scanning, manifest."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vkd.indexer.build import parse_bytes
from vkd.indexer.decode import DecodeError, decode_bytes, decode_file, pixel_guard, to_rgb
from vkd.indexer.faiss_index import (
    FLAT_MAX_ROWS,
    HNSW_MAX_ROWS,
    BudgetTooSmallError,
    FaissSearcher,
    build_faiss,
    choose_index,
    flat_bytes,
    hnsw_bytes,
    ivfpq_bytes,
)
from vkd.indexer.manifest import (
    MANIFEST_NAME,
    ManifestError,
    commit_manifest,
    new_manifest,
    read_manifest,
    remove_unlisted,
)
from vkd.indexer.scan import FileEntry, scan_images

MODEL = {"name": "m", "fingerprint": "f" * 16, "dim": 8, "family": "clip"}


# ---------------------------------------------------------------- choose_index (pure)

def test_small_shards_are_flat_and_large_ones_are_not() -> None:
    assert choose_index(1_000, 512).kind == "flat"
    assert choose_index(FLAT_MAX_ROWS, 512).kind == "flat"
    medium = choose_index(FLAT_MAX_ROWS + 1, 512)
    assert medium.kind == "hnsw" and medium.params["M"] == 32 and medium.factory == "HNSW32"
    large = choose_index(HNSW_MAX_ROWS * 5, 512)
    assert large.kind == "ivfpq" and large.params["rescore"]
    assert large.params["nlist"] == round(4 * math.sqrt(HNSW_MAX_ROWS * 5))
    assert 512 % large.params["m"] == 0 and large.params["nbits"] == 8
    assert large.factory == f"IVF{large.params['nlist']},PQ{large.params['m']}x8np"


def test_memory_budget_moves_down_the_ladder() -> None:
    n, dim = 200_000, 768
    roomy = choose_index(n, dim, 10 * 2**30)
    assert roomy.kind == "hnsw" and roomy.estimated_bytes == hnsw_bytes(n, dim) <= 10 * 2**30
    tight = 100 * 2**20
    spec = choose_index(n, dim, tight)
    assert spec.kind == "ivfpq" and spec.estimated_bytes <= tight < hnsw_bytes(n, dim)
    m = spec.params["m"]
    assert dim % m == 0
    # the chosen m is the largest divisor (<= 64) that fits: the next larger one would not
    larger = [d for d in range(m + 1, 65) if dim % d == 0]
    assert all(ivfpq_bytes(n, dim, spec.params["nlist"], d) > tight for d in larger)
    # a small shard whose flat index would not fit the budget is not flat
    assert flat_bytes(1_000, 512) > 1_000_000
    assert choose_index(1_000, 512, 1_000_000).kind != "flat"


def test_budget_too_small_says_how_much_is_needed() -> None:
    with pytest.raises(BudgetTooSmallError, match="raise the budget") as caught:
        choose_index(10_000_000, 512, 1_000)
    assert caught.value.needed > 1_000
    assert choose_index(10_000_000, 512, caught.value.needed).estimated_bytes <= caught.value.needed


def test_forced_types_get_parameters_that_train_on_small_shards() -> None:
    assert choose_index(10, 32, 1, "flat").kind == "flat"  # forced: the budget does not veto
    assert choose_index(10, 32, None, "hnsw").kind == "hnsw"
    spec = choose_index(500, 32, None, "ivfpq")
    assert spec.params["nlist"] <= 500 // 39 and (2 ** spec.params["nbits"]) * 39 <= 500
    with pytest.raises(ValueError, match="index_type"):
        choose_index(10, 32, None, "annoy")
    with pytest.raises(ValueError, match="dim"):
        choose_index(10, 0)


def test_choose_index_does_not_import_faiss() -> None:
    code = ("import sys; from vkd.indexer.faiss_index import choose_index; "
            "choose_index(10**7, 512, 2**30); assert 'faiss' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def one_faiss_thread():
    """One OpenMP thread: k-means on a shared, oversubscribed CI machine otherwise spins for seconds."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_search_is_exact_and_never_returns_retired_rows(kind: str, one_faiss_thread) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = choose_index(len(vectors), 32, None, kind)
    retired = np.arange(0, 2_000, 3, dtype=np.int64)
    searcher = FaissSearcher(build_faiss(vectors, spec), spec, vectors, retired)
    queries = vectors[[1, 2, 4]]
    scores, rows = searcher.search(queries, 10)
    assert rows.shape == (3, 10) and not np.isin(rows, retired).any()
    assert list(rows[:, 0]) == [1, 2, 4]  # a live stored vector finds itself first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[rows]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # more than the live rows: padded with -1 / -inf
    few = FaissSearcher(build_faiss(vectors[:5], choose_index(5, 32)), choose_index(5, 32), vectors[:5],
                        np.array([0], dtype=np.int64))
    scores, rows = few.search(queries[:1], 8)
    assert sorted(rows[0, :4]) == [1, 2, 3, 4] and (rows[0, 4:] == -1).all() and np.isinf(scores[0, 4:]).all()


# ---------------------------------------------------------------- decoding

def _bytes(image: Image.Image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(w: int = 40, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = decode_bytes(_bytes(_noise(40, 20), "JPEG", exif=exif))
    assert image.mode == "RGB" and image.size == (20, 40)


def test_unusual_modes_become_8bit_rgb() -> None:
    cmyk = decode_bytes(_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[..., 0].mean() > 200  # no cyan: red
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    gray16 = decode_bytes(_bytes(Image.fromarray(ramp), "PNG"))
    values = np.asarray(gray16)[..., 0]
    assert gray16.mode == "RGB" and values.min() == 0 and values.max() == 255  # scaled, not clipped
    assert abs(int(values[4, 0]) - round(ramp[4, 0] / 257)) <= 1
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    rgb = np.asarray(decode_bytes(_bytes(palette, "PNG", transparency=0)))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (10, 20, 30)  # composited on white
    la = np.asarray(to_rgb(Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), mode="LA")))
    assert tuple(la[0, 0]) == (255, 255, 255) and tuple(la[0, 1]) == (50, 50, 50)
    floats = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F"))
    assert list(np.asarray(floats)[0, :, 0]) == [0, 128, 255]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    first = np.asarray(decode_bytes(data))
    assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty file"),
    (b"just some text, not pixels", "not an image"),
])
def test_non_images_are_rejected_with_a_reason(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_bytes(data)


def test_bombs_and_truncated_files_are_skipped_not_raised(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    _noise(200, 100).save(big)
    entry = FileEntry("big.png", str(big), big.stat().st_size, big.stat().st_mtime_ns)
    skipped = decode_file(entry, max_pixels=10_000)
    assert "decompression bomb" in skipped.reason and skipped.max_pixels == 10_000
    with pixel_guard(10_000):  # PIL's own check, turned into an error, gives the same verdict
        assert "decompression bomb" in decode_file(entry, max_pixels=10_000).reason
    assert Image.MAX_IMAGE_PIXELS != 10_000  # restored
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_bytes(_noise(64, 48), "JPEG")[:600])
    entry = FileEntry("cut.jpg", str(truncated), 600, 0)
    assert "truncated" in decode_file(entry).reason.lower()
    gone = FileEntry("gone.jpg", str(tmp_path / "gone.jpg"), 1, 0)
    assert "disappeared" in decode_file(gone).reason
    with pytest.raises(DecodeError, match="aspect ratio"):
        decode_bytes(_bytes(_noise(1, 300), "PNG"))


# ---------------------------------------------------------------- scanning

def test_scan_survives_symlink_loops_and_skips_hidden_and_excluded(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "index").mkdir()
    for path in ("x.jpg", "a/y.PNG", "a/b/z.webp", ".hidden/h.jpg", ".dot.jpg", "index/shard.jpg", "notes.txt"):
        (root / path).write_bytes(b"content")
    os.symlink("../..", root / "a" / "b" / "up")  # a loop back to the root
    os.symlink("a", root / "alias")  # a second name for a folder already walked
    os.symlink("l2.jpg", root / "l1.jpg")
    os.symlink("l1.jpg", root / "l2.jpg")
    entries, skipped = scan_images(root, exclude=[root / "index"])
    assert [e.path for e in entries] == ["a/b/z.webp", "a/y.PNG", "x.jpg"]
    assert {s.path for s in skipped} == {"l1.jpg", "l2.jpg"}
    assert entries[0].id == entries[0].id and len({e.id for e in entries}) == 3


# ---------------------------------------------------------------- manifest

def test_manifest_commit_is_atomic_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    manifest = new_manifest(tmp_path, MODEL, None, {"index_type": "auto"})
    commit_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path)["student"] == MODEL
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temporary left behind
    for name in ("shard-00003.arrow", "shard-00003.faiss", "manifest.json.tmp-999", "shard-00004.arrow.tmp-1",
                 "my-notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_unlisted(tmp_path, read_manifest(tmp_path))
    assert removed == ["manifest.json.tmp-999", "shard-00003.arrow", "shard-00003.faiss", "shard-00004.arrow.tmp-1"]
    assert (tmp_path / "my-notes.txt").exists()  # never touch what is not ours


def test_bad_manifests_name_the_key_at_fault(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a vkd index"):
        read_manifest(tmp_path)
    manifest = new_manifest(tmp_path, MODEL, None, {})
    manifest["version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="version 99"):
        read_manifest(tmp_path)
    manifest["version"] = 1
    del manifest["student"]["dim"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="'student'"):
        read_manifest(tmp_path)


def test_parse_bytes() -> None:
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1e6") == 10**6 and parse_bytes(123) == 123 and parse_bytes(None) is None
    with pytest.raises(ValueError, match="2GB"):
        parse_bytes("lots")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    from vkd.indexer.fsutil import IndexLockedError, writer_lock

    with writer_lock(tmp_path), pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"), \
            writer_lock(tmp_path):
        pass
    with writer_lock(tmp_path):  # released on exit
        pass
