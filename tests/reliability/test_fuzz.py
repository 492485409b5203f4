"""Fuzzing what vkd reads from disk: image bytes and manifest.json.

(a) ``decode_bytes`` on arbitrary bytes and on valid PNG/JPEG/GIF/WebP/TIFF/BMP files
    mutated (bit flips, truncations, inserted bytes, chunks and segments, edited sizes and
    EXIF orientations) returns an RGB image or raises ``DecodeError`` — nothing else.
(b) A committed manifest.json mutated (keys deleted, values replaced by other JSON types,
    negative/float/huge/string counts, shard names leading out of the index directory,
    unknown index kinds, nested junk, torn text): ``verify_index``, ``Index.open``, shard
    search and ``Retriever.search`` work or raise ``ManifestError`` (a ``ValueError``) naming
    the file — never KeyError/TypeError/AttributeError/IndexError/faiss's RuntimeError — and
    no file outside the index directory is ever opened.

Hypothesis runs derandomized (the same examples on every run), without deadlines; the
number of examples tried is reported through the ``reliability_figures`` fixture.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import shutil
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from vkd.indexer import Index, IndexMismatchError, ManifestError, build_index, verify_index
from vkd.indexer.decode import DecodeError, decode_bytes
from vkd.models import load_encoder
from vkd.retrieval import Retriever

MAX_PIXELS = 1 << 20  # the guards are the same code at any bound; this one keeps an example cheap


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- (a) image bytes ----------------------------------------------------------------------------------

def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8), mode="RGBA")
    palette = rgb.convert("P")
    gray16 = Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: EXIF orientation is applied on decode
    frames = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    seeds = {
        "png-rgb": _encode(rgb, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-palette-trns": _encode(palette, "PNG", transparency=0),
        "png-gray16": _encode(gray16, "PNG"),
        "png-1bit": _encode(rgb.convert("1"), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "jpeg-progressive-exif": _encode(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0),
        "tiff-raw": _encode(rgb, "TIFF"),
        "tiff-lzw-rgba": _encode(rgba, "TIFF", compression="tiff_lzw"),
        "tiff-gray16": _encode(gray16, "TIFF"),
        "bmp": _encode(rgb, "BMP"),
    }
    if features.check("webp"):
        seeds["webp-lossy"] = _encode(rgb, "WEBP", quality=80)
        seeds["webp-lossless-alpha"] = _encode(rgba, "WEBP", lossless=True)
    return seeds


SEEDS = _seeds()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, payload: bytes, fix_crc: bool = True) -> bytes:
    crc = zlib.crc32(kind + payload) if fix_crc else zlib.crc32(kind + payload) ^ 1
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _after_first_png_chunk(data: bytes) -> int:
    if not data.startswith(PNG_SIGNATURE) or len(data) < 16:
        return min(len(data), 8)
    return min(len(data), 8 + 12 + struct.unpack(">I", data[8:12])[0])


def _set_dimensions(data: bytearray, width: int, height: int) -> bytearray:
    """Edit the size a file declares, where each format keeps it (PNG with a valid CRC)."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 33:
        ihdr = bytes(data[16:29])
        ihdr = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF) + ihdr[8:]
        data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    elif data[:3] == b"GIF" and len(data) >= 10:
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data[:2] == b"BM" and len(data) >= 26:  # a negative height (top-down rows) is a bit pattern away
        data[18:26] = struct.pack("<II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    elif data[:2] == b"\xff\xd8":
        sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        if sof >= 0 and len(data) >= sof + 9:
            data[sof + 5:sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8X" and len(data) >= 30:  # canvas size - 1, 24 bits each
        data[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8 " and len(data) >= 30:  # 14 bits + 2 scale bits each
        data[26:30] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8L" and len(data) >= 25:  # 14 bits each, after 0x2f
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (int.from_bytes(data[21:25], "little")
                                                                            & ~0xFFFFFFF & 0xFFFFFFFF)
        data[21:25] = bits.to_bytes(4, "little")
    elif data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:  # ImageWidth/ImageLength entries of IFD 0
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", data[4:8])[0]
        if ifd + 2 <= len(data):
            count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
            for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
                tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
                if tag in (256, 257):
                    value = width if tag == 256 else height
                    data[entry + 8:entry + 12] = (struct.pack(order + "HH", value & 0xFFFF, 0) if kind == 3
                                                  else struct.pack(order + "I", value & 0xFFFFFFFF))
    return data


def _orientation_block(data: bytes, value: int) -> tuple[int, bytes]:
    """An EXIF block with Orientation = ``value`` where the format carries one: (offset, bytes)."""
    exif = Image.Exif()
    exif[0x0112] = value
    payload = exif.tobytes()
    if data.startswith(PNG_SIGNATURE):
        return _after_first_png_chunk(data), _png_chunk(b"eXIf", payload[6:] if payload.startswith(b"Exif") else payload)
    if data[:2] == b"\xff\xd8":
        segment = payload if payload.startswith(b"Exif") else b"Exif\x00\x00" + payload
        return 2, b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    return len(data) // 2, payload


OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 20), st.integers(1, 512), st.integers(0, 1 << 20)),
    st.tuples(st.just("png-chunk"), st.sampled_from([b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"iCCP", b"zTXt",
                                                     b"tEXt", b"eXIf", b"acTL", b"fcTL", b"gAMA", b"zzZz"]),
              st.binary(max_size=96), st.booleans()),
    st.tuples(st.just("jpeg-segment"), st.sampled_from([0xC0, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD, 0xE0, 0xE1, 0xE2, 0xEE,
                                                        0xFE, 0xD9]), st.binary(max_size=96)),
    st.tuples(st.just("dimensions"), st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 32) - 1)),
              st.one_of(st.integers(0, 70_000), st.integers(0, (1 << 32) - 1))),
    st.tuples(st.just("orientation"), st.one_of(st.integers(0, 9), st.integers(0, 65535))),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for op in ops:
        kind, size = op[0], len(out)
        if kind == "flip" and size:
            out[op[1] % size] ^= 1 << op[2]
        elif kind == "truncate":
            del out[op[1] % (size + 1):]
        elif kind == "insert":
            out[op[1] % (size + 1):op[1] % (size + 1)] = op[2]
        elif kind == "overwrite" and size:
            at = op[1] % size
            out[at:at + len(op[2])] = op[2]
        elif kind == "duplicate" and size:
            start = op[1] % size
            piece = out[start:start + op[2]]
            at = op[3] % (size + 1)
            out[at:at] = piece
        elif kind == "png-chunk":
            at = _after_first_png_chunk(bytes(out))
            out[at:at] = _png_chunk(op[1], op[2], fix_crc=op[3])
        elif kind == "jpeg-segment":
            at = 2 if out[:2] == b"\xff\xd8" else size // 2
            out[at:at] = bytes([0xFF, op[1]]) + struct.pack(">H", min(len(op[2]) + 2, 0xFFFF)) + op[2]
        elif kind == "dimensions":
            out = _set_dimensions(out, op[1], op[2])
        elif kind == "orientation":
            at, block = _orientation_block(bytes(out), op[1])
            out[at:at] = block
    return bytes(out)


def decode_outcome(data: bytes) -> str:
    """"decoded" or "refused"; anything but ``DecodeError`` propagates (the property's failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd EXIF and the like: not our contract
        try:
            image = decode_bytes(data, max_pixels=MAX_PIXELS)
        except DecodeError as error:
            assert str(error).strip(), "a DecodeError must say what is wrong"
            return "refused"
    assert isinstance(image, Image.Image) and image.mode == "RGB", (type(image), getattr(image, "mode", None))
    assert 1 <= image.width * image.height <= MAX_PIXELS
    assert np.asarray(image).shape == (image.height, image.width, 3)
    return "decoded"


def run_decode_fuzz(strategy: st.SearchStrategy[tuple[str, bytes]], max_examples: int, tried: Counter) -> None:
    @fuzz_settings(max_examples)
    @given(strategy)
    def probe(case: tuple[str, bytes]) -> None:
        label, data = case
        tried[f"{label}:{decode_outcome(data)}"] += 1
        tried["examples"] += 1

    probe()


def report(figures: Callable[..., None], name: str, tried: Counter) -> None:
    """Reported whether the property held or not: a failing run's figures say how far it got."""
    outcomes = dict(sorted((key, value) for key, value in tried.items() if key != "examples"))
    figures(fuzz=name, examples=tried["examples"], outcomes=outcomes)


MAGICS = [b"", PNG_SIGNATURE, b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
          b"RIFF\x00\x00\x00\x00WEBPVP8L", b"II*\x00", b"MM\x00*", b"BM", PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"]
ARBITRARY = st.tuples(st.just("arbitrary"),
                      st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGICS), st.binary(max_size=512)))
MUTATED = st.builds(lambda name, ops: (name.split("-")[0], mutate(SEEDS[name], ops)),
                    st.sampled_from(sorted(SEEDS)), st.lists(OPS, min_size=1, max_size=4))


def test_every_seed_image_decodes() -> None:
    """The fuzzer's starting points are valid: a mutation is what makes them fail."""
    for name, data in SEEDS.items():
        assert decode_outcome(data) == "decoded", name


@pytest.mark.parametrize("kind", ["arbitrary", "mutated"])
def test_decode_bytes_raises_only_decode_error(kind: str, reliability_figures: Callable[..., None]) -> None:
    tried: Counter = Counter()
    try:
        run_decode_fuzz(ARBITRARY if kind == "arbitrary" else MUTATED, 300, tried)
    finally:
        report(reliability_figures, f"decode_bytes/{kind}", tried)


@pytest.mark.long
@pytest.mark.parametrize("kind", ["arbitrary", "mutated"])
def test_decode_bytes_raises_only_decode_error_long(kind: str, reliability_figures: Callable[..., None]) -> None:
    tried: Counter = Counter()
    try:
        run_decode_fuzz(ARBITRARY if kind == "arbitrary" else MUTATED, 5000, tried)
    finally:
        report(reliability_figures, f"decode_bytes/{kind}", tried)


# -- (b) manifest.json --------------------------------------------------------------------------------

@dataclass
class FuzzIndex:
    out: Path
    outside: Path  # a folder next to the index holding valid copies of its shard files
    text: str  # the committed manifest.json
    manifest: dict[str, Any]
    paths: list[tuple[Any, ...]]  # every JSON path in it
    files: dict[str, tuple[int, int]]  # name -> (size, mtime_ns) of the index's files
    student: Any
    teacher: Any
    query: np.ndarray


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _json_paths(item, (*prefix, i))


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def fuzz_index(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, tiny_clip_teacher: Path) -> Iterator[FuzzIndex]:
    """Two shards (HNSW and flat) with a retired row, built once; each example rewrites only
    manifest.json, which is restored afterwards."""
    root = tmp_path_factory.mktemp("fuzz-manifest")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"img{i:03d}.png")
    hidden = root / "later"
    hidden.mkdir()
    for i in (3, 4, 5):
        (images / f"img{i:03d}.png").rename(hidden / f"img{i:03d}.png")
    student = load_encoder(tiny_clip, device="cpu")
    teacher = load_encoder(tiny_clip_teacher, device="cpu")
    out = root / "idx"
    build_index(images, out, student=student, teacher=teacher, shard_size=3, index_type="hnsw")
    for i in (3, 4, 5):
        (hidden / f"img{i:03d}.png").rename(images / f"img{i:03d}.png")
    build_index(images, out, student=student, teacher=teacher, shard_size=3, index_type="flat")
    (images / "img001.png").unlink()
    build_index(images, out, student=student, teacher=teacher, shard_size=3, index_type="flat")
    assert verify_index(out) == []
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    assert [s["index"]["kind"] for s in manifest["shards"]] == ["hnsw", "flat"] and manifest["shards"][0]["retired"]
    outside = root / "outside"
    outside.mkdir()
    for shard in manifest["shards"]:
        for key in ("arrow", "faiss"):
            shutil.copy2(out / shard[key], outside / shard[key])
            shutil.copy2(out / shard[key], outside / f"evil.{key}")
    files = _files(out)
    yield FuzzIndex(out, outside, text, manifest, list(_json_paths(manifest)), files, student, teacher,
                    student.encode_text(["colourful noise"]))
    (out / "manifest.json").write_text(text)


def _outside_targets(fx: FuzzIndex) -> list[str]:
    rel = os.path.relpath(fx.outside, fx.out)
    return [f"{rel}/shard-00000", f"{rel}/evil", str(fx.outside / "shard-00000"), str(fx.outside / "evil"),
            "../../etc/passwd", "/etc/passwd", "./shard-00000", "shard-00000/../shard-00001", "sub/shard-00000",
            "shard-00000\x00.arrow", "..", "/", ""]


SPECIAL = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**64 + 1, -(2**63), 10**30, 1.5, -0.0, 1e308,
           math.inf, -math.inf, math.nan, "", "0", "3", "-1", "abc", "é\u202e", "a" * 2000, [], {}, [None], [[[]]],
           {"kind": "hnsw"}, {"": None}, "flat", "hnsw", "ivfpq", "IVF4,PQ8", "unknown-kind", "shard-00000",
           "shard-00001", "shard-99999", "shard-00000.arrow", "shard-00001.faiss", "clip", "0" * 64, "f" * 64]
KEYS = ["format", "version", "images_root", "student", "teacher", "build", "shards", "next_shard", "rows",
        "live_rows", "skipped", "unfinished_run", "name", "arrow", "faiss", "arrow_sha256", "faiss_sha256",
        "arrow_bytes", "faiss_bytes", "index", "retired", "kind", "factory", "params", "efSearch", "nprobe",
        "rescore", "rescore_factor", "metric", "dim", "fingerprint", "family", "started", "pid", "x", "__proto__"]
JUNK = st.recursive(
    st.one_of(st.sampled_from(SPECIAL), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=6)


def _locate(doc: Any, path: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """(container, key) of ``path`` in ``doc``, or None when the path no longer exists."""
    node = doc
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(node, dict) and path[-1] in node or (isinstance(node, list) and isinstance(path[-1], int)
                                                        and path[-1] < len(node)):
        return node, path[-1]
    return None


class ManifestCase:
    """The edits in words (all hypothesis prints of a failing example: not the whole file),
    the bytes written as manifest.json, and those bytes parsed (None when not JSON)."""

    def __init__(self, done: list[str], data: bytes, doc: Any) -> None:
        self.done, self.data, self.doc = done, data, doc

    def __repr__(self) -> str:
        return f"ManifestCase({self.done!r})"


@st.composite
def manifest_cases(draw: st.DrawFn, fx: FuzzIndex) -> ManifestCase:
    doc = copy.deepcopy(fx.manifest)
    done = []
    paths = [p for p in fx.paths if p]
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one edit: a single bad value must be caught
        op = draw(st.sampled_from(["special"] * 3 + ["replace"] * 3 + ["delete"] * 2 + ["add"] * 2
                                  + ["escape", "shards", "swap-kinds"]))
        if op in ("delete", "replace", "special"):
            path = draw(st.sampled_from(paths))
            found = _locate(doc, path)
            if found is None:
                continue
            container, key = found
            if op == "delete":
                del container[key]
            else:
                container[key] = draw(JUNK if op == "replace" else st.sampled_from(SPECIAL))
            done.append(f"{op} {'.'.join(map(str, path))}")
        elif op == "add":
            path = draw(st.sampled_from([p for p in fx.paths if isinstance(_value(fx.manifest, p), dict)]))
            found = _locate(doc, path) if path else (None, None)
            target = doc if not path else (found[0][found[1]] if found else None)
            if isinstance(target, dict):
                key = draw(st.sampled_from(KEYS))
                target[key] = draw(JUNK)
                done.append(f"add {'.'.join(map(str, path))}.{key}")
        elif op == "escape" and isinstance(doc.get("shards"), list) and doc["shards"]:
            i = draw(st.integers(0, len(doc["shards"]) - 1))
            if isinstance(doc["shards"][i], dict):
                base = draw(st.sampled_from(_outside_targets(fx)))
                fields = draw(st.sampled_from([("name",), ("arrow",), ("faiss",), ("arrow", "faiss"),
                                               ("name", "arrow", "faiss")]))
                for key in fields:
                    doc["shards"][i][key] = base if key == "name" else f"{base}.{key}"
                done.append(f"escape shards[{i}].{'+'.join(fields)} -> {base!r}")
        elif op == "shards" and isinstance(doc.get("shards"), list) and doc["shards"]:
            how = draw(st.sampled_from(["duplicate", "reverse", "drop", "swap-files"]))
            shards = doc["shards"]
            if how == "duplicate":
                shards.append(copy.deepcopy(shards[0]))
            elif how == "reverse":
                shards.reverse()
            elif how == "drop":
                shards.pop()
            elif len(shards) > 1 and all(isinstance(s, dict) for s in shards[:2]):
                for key in ("arrow", "faiss", "arrow_sha256", "faiss_sha256", "arrow_bytes", "faiss_bytes"):
                    if key in shards[0] and key in shards[1]:
                        shards[0][key], shards[1][key] = shards[1][key], shards[0][key]
            done.append(f"shards {how}")
        elif op == "swap-kinds" and isinstance(doc.get("shards"), list):
            for shard in doc["shards"]:
                if isinstance(shard, dict) and isinstance(shard.get("index"), dict):
                    shard["index"]["kind"] = draw(st.sampled_from(["flat", "hnsw", "ivfpq", "HNSW", "auto", ""]))
            done.append("swap index kinds")
    data = json.dumps(doc, indent=1).encode()
    raw = draw(st.sampled_from(["as-is"] * 12 + ["truncate", "flip", "nest", "bom", "latin-1", "duplicate-key"]))
    if raw == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif raw == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    elif raw == "nest":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        data = b'{"format": "vkd-index", "version": 1, "shards": ' + b"[" * depth + b"]" * depth + b"}"
    elif raw == "bom":
        data = b"\xef\xbb\xbf" + data
    elif raw == "latin-1":
        data = data.replace(b'"shards"', b'"sh\xe4rds"', 1)
    elif raw == "duplicate-key":
        data = data.replace(b"{", b'{"shards": 5, ', 1)
    if raw != "as-is":
        done.append(f"raw {raw}")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    return ManifestCase(done, data, parsed)


def _value(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


SHARD_FILE = re.compile(r"^shard-\d{5,}(\.arrow|\.faiss)?$")


def _escapes(doc: Any) -> list[str]:
    """Shard file names in ``doc`` that are not plain names inside the index directory."""
    bad = []
    shards = doc.get("shards") if isinstance(doc, dict) else None
    for shard in shards if isinstance(shards, list) else []:
        if isinstance(shard, dict):
            for key in ("name", "arrow", "faiss"):
                value = shard.get(key)
                if isinstance(value, str) and not SHARD_FILE.match(value):
                    bad.append(value)
    return bad


def _open_outside(fx: FuzzIndex) -> list[str]:
    """Files this process holds open or mapped that lie outside the index directory and are
    ones a manifest could point at (the copies next to it, /etc/passwd)."""
    suspects = (str(fx.outside), "/etc/passwd")
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(suspects):
            found.append(target)
    with open("/proc/self/maps") as maps:
        found += [line.split()[-1] for line in maps if any(s in line for s in suspects)]
    return found


def _named(error: BaseException, fx: FuzzIndex) -> None:
    message = str(error)
    assert "manifest.json" in message or str(fx.out) in message, f"{type(error).__name__} names no file: {message}"


def probe_manifest(fx: FuzzIndex, data: bytes, doc: Any, done: list[str]) -> dict[str, str]:
    """Write ``data`` as manifest.json and read the index every way; returns what each way did."""
    (fx.out / "manifest.json").write_bytes(data)
    outcome: dict[str, str] = {}
    try:
        problems = verify_index(fx.out)
        assert isinstance(problems, list) and all(isinstance(p, str) and p for p in problems), problems
        outcome["verify"] = "sound" if not problems else "problems"
    except ManifestError as error:
        _named(error, fx)
        outcome["verify"] = "refused"
    index = None
    try:
        index = Index.open(fx.out)
        outcome["open"] = "opened"
    except ManifestError as error:
        _named(error, fx)
        outcome["open"] = "refused"
    escapes = _escapes(doc)
    if escapes and doc is not None:
        # a shard file name leading out of the index directory is refused by name, whatever it points at
        assert outcome["open"] == "refused", f"opened an index whose shard files are {escapes} ({done})"
        assert outcome["verify"] != "sound", f"verify passed shard files {escapes}"
    if index is not None:
        try:
            for shard in index.shards:
                if shard.live_rows:
                    _, rows = shard.search(fx.query, min(3, shard.live_rows))
                    shard.records(rows[0][rows[0] >= 0])
            outcome["shard-search"] = "ok"
        except ManifestError as error:
            _named(error, fx)
            outcome["shard-search"] = "refused"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # another teacher fingerprint only warns
            try:
                retriever = Retriever(fx.out, student=fx.student, teacher=fx.teacher)
                for rerank in (True, False):
                    hits = retriever.search("colourful noise", k=3, rerank=rerank)
                    assert len(hits) <= 3
                outcome["retriever"] = "ok"
            except (ManifestError, IndexMismatchError) as error:
                _named(error, fx)
                outcome["retriever"] = type(error).__name__
        leaked = _open_outside(fx)
        assert not leaked, f"opened files outside the index directory: {leaked} ({done})"
        close = getattr(index, "close", None)
        if close is not None:
            close()
    if outcome["verify"] == "sound":
        # what verify calls sound opens and searches
        assert outcome["open"] == "opened" and outcome.get("shard-search") == "ok", (outcome, done)
    assert _files(fx.out).keys() == fx.files.keys() and all(
        _files(fx.out)[name] == stamp for name, stamp in fx.files.items() if name != "manifest.json"), \
        "reading the index changed its files"
    return outcome


def run_manifest_fuzz(fx: FuzzIndex, max_examples: int, tried: Counter) -> None:
    @fuzz_settings(max_examples)
    @given(manifest_cases(fx))
    def probe(case: ManifestCase) -> None:
        done, doc = case.done, case.doc
        outcome = probe_manifest(fx, case.data, doc, done)
        tried["examples"] += 1
        tried[f"open:{outcome['open']}"] += 1
        tried[f"verify:{outcome['verify']}"] += 1
        if "retriever" in outcome:
            tried[f"retriever:{outcome['retriever']}"] += 1
        if _escapes(doc):
            tried["escapes-refused"] += 1

    try:
        probe()
    finally:
        (fx.out / "manifest.json").write_text(fx.text)


def test_the_unmutated_manifest_opens_and_searches(fuzz_index: FuzzIndex) -> None:
    outcome = probe_manifest(fuzz_index, fuzz_index.text.encode(), fuzz_index.manifest, [])
    assert outcome == {"verify": "sound", "open": "opened", "shard-search": "ok", "retriever": "ok"}


@pytest.mark.parametrize("fields", [("name",), ("arrow",), ("faiss",), ("arrow", "faiss"), ("name", "arrow", "faiss")])
def test_shard_files_outside_the_index_are_refused_by_name(fuzz_index: FuzzIndex, fields: tuple[str, ...]) -> None:
    """The copies outside are valid shards with the right checksums: only their names can refuse them."""
    fx = fuzz_index
    try:
        for target in _outside_targets(fx):
            doc = copy.deepcopy(fx.manifest)
            for key in fields:
                doc["shards"][0][key] = target if key == "name" else f"{target}.{key}"
            outcome = probe_manifest(fx, json.dumps(doc).encode(), doc, [f"{fields} -> {target!r}"])
            assert outcome["open"] == "refused", target
    finally:
        (fx.out / "manifest.json").write_text(fx.text)


WRONG_TYPES = [None, True, -1, 1.5, 2**64, "abc", [], {}]
EXTRA_PARAMS = ("efSearch", "nprobe", "rescore_factor")  # read at search time, absent from some shards
_DELETE = object()


def _generalised(path: tuple[Any, ...]) -> str:
    return ".".join("[*]" if isinstance(step, int) else str(step) for step in path)


def test_every_manifest_value_replaced_by_each_json_type(fuzz_index: FuzzIndex,
                                                         reliability_figures: Callable[..., None]) -> None:
    """The systematic counterpart of the fuzzing below: every key deleted, and every value
    (plus the search parameters a shard may lack) set to each other JSON type in turn."""
    fx = fuzz_index
    leaves = [path for path in fx.paths if path and not isinstance(_value(fx.manifest, path), dict | list)]
    leaves += [path for path in fx.paths if path and _value(fx.manifest, path) in ([], {})]
    for i, shard in enumerate(fx.manifest["shards"]):
        leaves += [("shards", i, "index", "params", key) for key in EXTRA_PARAMS if key not in shard["index"]["params"]]
    cases = [(path, _DELETE) for path in fx.paths if path]
    cases += [(path, value) for path in leaves for value in WRONG_TYPES
              if not (path[:-1] and _locate(fx.manifest, path) and _value(fx.manifest, path) == value
                      and type(_value(fx.manifest, path)) is type(value))]
    failures: dict[tuple[str, str], str] = {}
    try:
        for path, value in cases:
            doc = copy.deepcopy(fx.manifest)
            parent = _value(doc, path[:-1])
            if value is _DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
                if path[-1] == "rescore_factor":
                    parent["rescore"] = True  # the factor is read only when re-scoring
            label = f"{'delete' if value is _DELETE else 'set'} {'.'.join(map(str, path))}" + (
                "" if value is _DELETE else f" = {json.dumps(value)}")
            try:
                probe_manifest(fx, json.dumps(doc).encode(), doc, [label])
            except Exception as error:  # every kind is a finding: collected, then reported together
                failures.setdefault((type(error).__name__, _generalised(path)), f"{label}: {str(error)[:160]}")
    finally:
        (fx.out / "manifest.json").write_text(fx.text)
    reliability_figures(fuzz="manifest/every-value", examples=len(cases), failures=len(failures))
    assert not failures, f"{len(failures)} kinds of malformed manifest are not refused cleanly:\n" + "\n".join(
        f"  {kind} at {where}; e.g. {example}" for (kind, where), example in sorted(failures.items()))


def test_mutated_manifests_are_read_or_refused_cleanly(fuzz_index: FuzzIndex,
                                                       reliability_figures: Callable[..., None]) -> None:
    tried: Counter = Counter()
    try:
        run_manifest_fuzz(fuzz_index, 300, tried)
    finally:
        report(reliability_figures, "manifest", tried)


@pytest.mark.long
def test_mutated_manifests_are_read_or_refused_cleanly_long(fuzz_index: FuzzIndex,
                                                            reliability_figures: Callable[..., None]) -> None:
    tried: Counter = Counter()
    try:
        run_manifest_fuzz(fuzz_index, 5000, tried)
    finally:
        report(reliability_figures, "manifest", tried)
