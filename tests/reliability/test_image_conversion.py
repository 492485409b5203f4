"""One conversion from file or PIL image to pixels, on every path (indexing, queries, encoders).

An image query must find the image itself, whatever its mode: transparency composited on
white, 16-bit and float scaled, palette transparency, EXIF orientation — the same pixels
the indexer stored a vector for. And an image query gets the indexer's guards: a
decompression bomb or a corrupt file is a clear ``ValueError`` naming the file, never a PIL
traceback or gigabytes of memory.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reliability.image_files import bomb_png
from vkd.cli import cli
from vkd.indexer import Index, build_index
from vkd.indexer.decode import decode_bytes, decode_file, pixel_guard
from vkd.indexer.scan import FileEntry
from vkd.models import load_encoder
from vkd.models.base import load_rgb
from vkd.retrieval.retriever import Retriever

W, H = 40, 32


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgba(seed: int) -> Image.Image:
    pixels = _rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    pixels[: H // 2, :, 3] = 0  # a fully transparent half: white once composited
    return Image.fromarray(pixels, mode="RGBA")


def _palette(seed: int) -> Image.Image:
    rng = _rng(seed)
    image = Image.new("P", (W, H))
    image.putpalette([int(v) for v in rng.integers(0, 256, 768)])
    indices = rng.integers(0, 16, (H, W))
    indices[: H // 2] = 0  # index 0 is the transparent one: half the image is white once composited
    image.putdata([int(v) for v in indices.ravel()])
    return image


def _odd_images() -> dict[str, tuple[Image.Image, dict]]:
    """name -> (image, save options): every mode whose plain convert("RGB") differs from the indexer's."""
    return {
        "rgba.png": (_rgba(1), {}),
        "rgba_soft.png": (Image.fromarray(np.dstack([
            _rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8),
            np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))]), mode="RGBA"), {}),
        "la.png": (Image.fromarray(_rng(3).integers(0, 256, (H, W, 2), dtype=np.uint8), mode="LA"), {}),
        "palette_index.png": (_palette(4), {"transparency": 0}),
        "palette_alpha.png": (_palette(5), {"transparency": bytes([0, 60, 120, 180] + [255] * 252)}),
        "rgba.webp": (_rgba(6), {"lossless": True}),
        "gray16.png": (Image.fromarray(_rng(7).integers(0, 65536, (H, W), dtype=np.uint16)), {}),
        "float.tiff": (Image.fromarray(_rng(8).random((H, W), dtype=np.float32), mode="F"), {}),
    }


@pytest.fixture(scope="module")
def odd_index(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, Path]:
    """(images folder, index) of the odd images and a few opaque ones to compete with them."""
    root = tmp_path_factory.mktemp("odd") / "images"
    root.mkdir()
    for name, (image, options) in _odd_images().items():
        image.save(root / name, **options)
    for i in range(4):
        Image.fromarray(_rng(100 + i).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / f"opaque{i}.png")
    out = root.parent / "index"
    build_index(root, out, student=str(tiny_clip), device="cpu", workers=1)
    return root, out


@pytest.fixture(scope="module")
def retriever(odd_index: tuple[Path, Path]) -> Retriever:
    return Retriever(odd_index[1], rerank=False, prefer="torch")


def _stored_vector(index: Index, shard: str, row: int) -> np.ndarray:
    (found,) = [s for s in index.shards if s.name == shard]
    return found.student_vectors([row])[0]


@pytest.mark.parametrize("name", sorted(_odd_images()))
def test_an_image_query_finds_itself_first(retriever: Retriever, odd_index: tuple[Path, Path], name: str) -> None:
    path = odd_index[0] / name
    with Image.open(path) as opened:  # handed over as opened: lazily loaded, mode as stored
        by_path, by_pil = retriever.search_batch([path, opened], k=3)
    for result in (by_path, by_pil):
        top = result[0]
        assert Path(top.path) == path, [hit.path for hit in result]
        assert top.score > 0.999
    top = by_path[0]
    stored = _stored_vector(retriever.index, top.shard, top.row)
    query = retriever.student.encode_images([path])[0]
    assert float(query @ stored) > 0.999


def test_load_rgb_of_a_pil_image_is_the_indexers_conversion() -> None:
    for name, (image, options) in _odd_images().items():
        buffer = io.BytesIO()
        image.save(buffer, format=Image.registered_extensions()[Path(name).suffix], **options)
        indexed = np.asarray(decode_bytes(buffer.getvalue()))
        with Image.open(io.BytesIO(buffer.getvalue())) as opened:
            assert np.array_equal(np.asarray(load_rgb(opened)), indexed), name
    rgba = _rgba(1)  # an in-memory image, never saved
    expected = np.asarray(rgba, dtype=np.float64)
    alpha = expected[..., 3:] / 255.0
    composited = np.rint(expected[..., :3] * alpha + 255.0 * (1 - alpha))
    converted = np.asarray(load_rgb(rgba))
    assert converted.shape == (H, W, 3) and (converted[: H // 2] == 255).all()
    assert np.abs(converted.astype(np.float64) - composited).max() <= 1


def test_exif_orientation_is_applied_to_paths_and_pil_images(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_rng(9).integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(path, exif=exif)
    indexed = np.asarray(decode_bytes(path.read_bytes()))
    assert indexed.shape == (40, 20, 3)
    assert np.array_equal(np.asarray(load_rgb(path)), indexed)
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(load_rgb(opened)), indexed)
        once = load_rgb(opened)
    assert load_rgb(once) is once  # already upright RGB: nothing to do, no copy


# ---------------------------------------------------------------- query guards

@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_encode_images_refuses_a_bomb_with_a_clear_error(tiny_clip: Path, bomb: Path) -> None:
    from vkd.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge

    encoder = load_encoder(tiny_clip, device="cpu")
    with pytest.raises(ImageTooLarge) as caught:
        encoder.encode_images([bomb])
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert str(bomb) in message and "20000x20000" in message and f"max_pixels={DEFAULT_MAX_PIXELS}" in message
    # the bound is configurable: per call, and through the bound in force (PIL's own knob)
    small = Image.new("L", (200, 100))
    with pytest.raises(ImageTooLarge, match="max_pixels=10000"):
        load_rgb(small, max_pixels=10_000)
    with pixel_guard(10_000), pytest.raises(ImageTooLarge, match="200x100 = 20000 pixels exceeds max_pixels=10000"):
        encoder.encode_images([small])
    assert load_rgb(small, max_pixels=20_000).size == (200, 100)


@pytest.mark.parametrize(("content", "words"), [
    (b"just some text, not pixels", "not an image"),
    (b"", "empty file"),
    ("truncated", "cannot decode"),
])
def test_encode_images_refuses_a_bad_file_naming_it(tiny_clip: Path, tmp_path: Path, content: bytes | str,
                                                    words: str) -> None:
    path = tmp_path / "query.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(_rng(10).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        content = buffer.getvalue()[:2000]
    path.write_bytes(content)
    encoder = load_encoder(tiny_clip, device="cpu")
    with pytest.raises(ValueError, match=words) as caught:
        encoder.encode_images([path])
    assert str(path) in str(caught.value)


def test_cli_image_search_with_a_bomb_exits_1_with_one_line(odd_index: tuple[Path, Path], bomb: Path,
                                                             tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_text("not a JPEG")
    for query, words in ((bomb, "decompression bomb"), (junk, "not an image")):
        result = CliRunner().invoke(cli, ["search", "--image", str(query), "--index", str(odd_index[1]),
                                          "--no-rerank", "--prefer", "torch"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and str(query) in lines[0] and words in lines[0], result.output


def test_bomb_skip_reason_quotes_the_bound_in_force_and_the_size(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    entry = FileEntry("big.png", str(path), path.stat().st_size, path.stat().st_mtime_ns)
    for guarded in (False, True):  # with PIL's own global check armed at the same bound, too
        if guarded:
            with pixel_guard(10_000):
                skipped = decode_file(entry, max_pixels=10_000)
        else:
            skipped = decode_file(entry, max_pixels=10_000)
        assert "200x100 = 20000 pixels" in skipped.reason and "max_pixels=10000" in skipped.reason, skipped.reason
        assert "20000 pixels exceeds" in skipped.reason and "limit of 20000" not in skipped.reason
        assert skipped.max_pixels == 10_000
