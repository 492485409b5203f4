"""The indexer end to end on tiny random CLIP models: CLI, formats on disk, incremental runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from click.testing import CliRunner
from PIL import Image

from vkd.cli import cli
from vkd.indexer import Index, IndexMismatchError, build_index, verify_index
from vkd.indexer.decode import decode_bytes
from vkd.indexer.manifest import commit_manifest, read_manifest
from vkd.models import load_encoder

# files whose RGB conversion is PIL's plain one, so encode_images(path) sees the same pixels
PLAIN = ["a.jpg", "anim.gif", "b.png", "cmyk.jpg", "png_named.jpg", "rotated.jpg", "sub/c.webp", "sub/d.bmp",
         "sub/deeper/e.tiff"]
# files the indexer converts with more care than convert("RGB"): 16-bit scaling, alpha on white
CONVERTED = ["gray16.png", "la.png", "palette_alpha.png"]
BAD = {"text.jpg": "not an image", "empty.png": "empty file", "truncated.jpg": "truncated",
       "bomb.png": "decompression bomb", "thin.png": "aspect ratio", "l1.jpg": "symbolic links",
       "l2.jpg": "symbolic links"}
MAX_PIXELS = 10_000  # bomb.png has 20 000


def _noise(rng: np.random.Generator, w: int = 40, h: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_messy_folder(root: Path) -> Path:
    """Good images in every format and mode the indexer must handle, and bad files of each kind."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    _noise(rng).save(root / "a.jpg")
    _noise(rng).save(root / "b.png")
    _noise(rng).save(root / "sub" / "c.webp")
    _noise(rng).save(root / "sub" / "d.bmp")
    _noise(rng).save(root / "sub" / "deeper" / "e.tiff")
    _noise(rng).save(root / "png_named.jpg", format="PNG")
    Image.fromarray(rng.integers(0, 255, (32, 40, 4), dtype=np.uint8), mode="CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (32, 40), dtype=np.uint16)).save(root / "gray16.png")
    palette = Image.new("P", (40, 32))
    palette.putpalette([int(v) for v in rng.integers(0, 255, 768)])
    palette.putdata([int(v) for v in rng.integers(0, 255, 40 * 32)])
    palette.save(root / "palette_alpha.png", transparency=0)
    Image.fromarray(rng.integers(0, 255, (32, 40, 2), dtype=np.uint8), mode="LA").save(root / "la.png")
    frames = [_noise(rng).convert("P") for _ in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(rng, 40, 20).save(root / "rotated.jpg", exif=exif)
    (root / "text.jpg").write_text("hello, I am not a JPEG")
    (root / "empty.png").write_bytes(b"")
    full = root / "whole.jpg"
    _noise(rng, 64, 48).save(full)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[:700])
    full.unlink()
    _noise(rng, 200, 100).save(root / "bomb.png")
    _noise(rng, 1, 200).save(root / "thin.png")
    (root / "notes.txt").write_text("not an image extension: ignored, not skipped")
    os.symlink("..", root / "sub" / "loop")
    os.symlink("l2.jpg", root / "l1.jpg")
    os.symlink("l1.jpg", root / "l2.jpg")
    return root


def make_plain_folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _noise(rng).save(root / f"img{i:03d}.png")
    return root


def read_shards(index_dir: Path) -> tuple[dict, pa.Table]:
    """All rows of all shards, read with plain pyarrow (no vkd code)."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    tables = []
    for shard in manifest["shards"]:
        reader = ipc.open_file(pa.memory_map(str(index_dir / shard["arrow"]), "r"))
        assert reader.num_record_batches == 1
        tables.append(reader.read_all())
    return manifest, pa.concat_tables(tables)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    return array.flatten().to_numpy().reshape(len(array), -1)


def test_cli_indexes_good_images_and_lists_bad_ones(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    images = make_messy_folder(tmp_path / "photos")
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(images), "--model", str(tiny_clip), "--teacher", str(tiny_clip_teacher),
                                 "--max-pixels", str(MAX_PIXELS), "--shard-size", "5", "--batch-size", "3",
                                 "--workers", "2", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "photos.vkd"  # the default --out: a sibling of the images folder
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"]
               for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == set(BAD)
    for path, words in BAD.items():
        assert words in skipped[path].lower(), (path, skipped[path])

    manifest, table = read_shards(out)
    assert len(manifest["shards"]) > 1 and manifest["skipped"] == len(BAD)
    assert sorted(table.column("path").to_pylist()) == sorted(PLAIN + CONVERTED)
    for shard in manifest["shards"]:
        index = faiss.read_index(str(out / shard["faiss"]))
        assert index.ntotal == shard["rows"] and index.d == manifest["student"]["dim"]
    rows = {path: i for i, path in enumerate(table.column("path").to_pylist())}
    assert (table.column("width")[rows["rotated.jpg"]].as_py(), table.column("height")[rows["rotated.jpg"]].as_py()) \
        == (20, 40)

    student, teacher = load_encoder(tiny_clip, device="cpu"), load_encoder(tiny_clip_teacher, device="cpu")
    student_vecs, teacher_vecs = vectors(table, "student_vec"), vectors(table, "teacher_vec")
    assert student_vecs.dtype == np.float32 and teacher_vecs.dtype == np.float16
    plain = [rows[p] for p in PLAIN]
    np.testing.assert_allclose(student_vecs[plain], student.encode_images([images / p for p in PLAIN]), atol=1e-5)
    np.testing.assert_allclose(teacher_vecs[plain].astype(np.float32),
                               teacher.encode_images([images / p for p in PLAIN]), atol=2e-3)
    converted = [decode_bytes((images / p).read_bytes()) for p in CONVERTED]
    np.testing.assert_allclose(student_vecs[[rows[p] for p in CONVERTED]], student.encode_images(converted),
                               atol=1e-5)

    info = runner.invoke(cli, ["index", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    info = json.loads(info.output)
    assert info["live_rows"] == len(PLAIN + CONVERTED) and info["skipped"] == len(BAD)
    assert info["student"]["fingerprint"] == student.fingerprint and info["teacher"]["dim"] == teacher.dim
    assert runner.invoke(cli, ["index", "verify", str(out)]).exit_code == 0

    # a corrupted shard is caught by verify, with a non-zero exit
    arrow = out / manifest["shards"][0]["arrow"]
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    broken = runner.invoke(cli, ["index", "verify", str(out)])
    assert broken.exit_code != 0 and "sha256" in broken.output


def test_library_api_and_search(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    images = make_plain_folder(tmp_path / "imgs", 7)
    student = load_encoder(tiny_clip, device="cpu")
    index = Index.build(images, tmp_path / "idx", student=student, teacher=str(tiny_clip_teacher), shard_size=4,
                        index_type="hnsw")
    assert len(index) == 7 and [s.rows for s in index.shards] == [4, 3]
    assert index.student["fingerprint"] == student.fingerprint and index.teacher["dim"] == 48
    shard = index.shards[1]
    query = shard.student_vectors([2])
    scores, rows = shard.search(query, 5)
    assert rows[0, 0] == 2 and rows[0, 3] == -1 and np.isinf(scores[0, 3:]).all()
    np.testing.assert_allclose(scores[0, :3], shard.student_vectors(rows[0, :3]) @ query[0], atol=1e-6)
    assert shard.teacher_vectors([0, 2]).shape == (2, 48)
    record = shard.records([2])[0]
    assert Path(record["path"]).is_file() and record["id"] and record["width"] == 40
    with pytest.raises(IndexError, match="out of range"):
        shard.records([3])
    with pytest.raises(ValueError, match="expected"):
        shard.search(np.zeros((1, 5), np.float32), 1)


def _touch(path: Path, image: Image.Image) -> None:
    before = path.stat().st_mtime_ns
    image.save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a changed mtime even on coarse clocks


def test_incremental_add_change_delete_then_compact(tmp_path: Path, tiny_clip: Path) -> None:
    images = make_plain_folder(tmp_path / "imgs", 6)
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    first = build_index(images, out, student=student, shard_size=4)
    assert (first.added, first.shards_written) == (6, 2)

    committed = (out / "manifest.json").stat().st_ino
    same = build_index(images, out, student=student, shard_size=4)
    assert (same.added, same.unchanged, same.retired) == (0, 6, 0)
    assert (out / "manifest.json").stat().st_ino == committed  # a no-op run commits nothing

    rng = np.random.default_rng(42)
    _noise(rng).save(images / "new.png")
    _touch(images / "img001.png", _noise(rng))
    (images / "img004.png").unlink()
    again = build_index(images, out, student=student, shard_size=4)
    assert (again.added, again.unchanged, again.retired) == (2, 4, 2)
    index = Index.open(out)
    assert len(index) == 6 and index.rows == 8
    assert verify_index(out) == []
    live = {}
    for shard in index.shards:
        retired = set(shard.retired_rows.tolist())
        for row, record in enumerate(shard.records(np.arange(shard.rows))):
            if row not in retired:
                live[record["relpath"]] = shard.student_vectors([row])[0]
        # the retired rows never come back from search, whatever the query
        if len(retired):
            _, rows = shard.search(shard.student_vectors(sorted(retired)), shard.rows)
            assert not np.isin(rows, list(retired)).any()
    assert sorted(live) == sorted(["img000.png", "img001.png", "img002.png", "img003.png", "img005.png", "new.png"])
    np.testing.assert_allclose(live["img001.png"], student.encode_images([images / "img001.png"])[0], atol=1e-5)

    runner = CliRunner()
    result = runner.invoke(cli, ["index", "compact", str(out)])
    assert result.exit_code == 0, result.output
    assert "dropped 2 retired rows" in result.output
    compacted = Index.open(out)
    assert len(compacted) == compacted.rows == 6 and all(not len(s.retired_rows) for s in compacted.shards)
    assert verify_index(out) == []
    assert sorted(f.name for f in out.glob("shard-*")) == sorted(
        name for s in compacted.manifest["shards"] for name in (s["arrow"], s["faiss"]))
    # an index opened before the compaction still reads its own snapshot
    assert index.shards[0].student_vectors([0]).shape == (1, student.dim)


def test_other_models_are_refused_until_rebuild(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    images = make_plain_folder(tmp_path / "imgs", 3)
    out = tmp_path / "idx"
    build_index(images, out, student=str(tiny_clip), device="cpu")
    runner = CliRunner()
    args = ["index", str(images), "--out", str(out), "--no-progress", "--device", "cpu"]
    refused = runner.invoke(cli, [*args, "--model", str(tiny_clip_teacher)])
    assert refused.exit_code != 0
    assert "fingerprint" in refused.output and "--rebuild" in refused.output and "--out" in refused.output
    with pytest.raises(IndexMismatchError, match="without a teacher"):
        build_index(images, out, student=str(tiny_clip), teacher=str(tiny_clip_teacher), device="cpu")
    rebuilt = runner.invoke(cli, [*args, "--model", str(tiny_clip_teacher), "--rebuild"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert Index.open(out).student["dim"] == 48 and len(Index.open(out)) == 3
    assert verify_index(out) == []
    other = make_plain_folder(tmp_path / "other", 1)
    with pytest.raises(IndexMismatchError, match="built from"):
        build_index(other, out, student=str(tiny_clip_teacher), device="cpu")
    tight = runner.invoke(cli, [*args[:2], "--out", str(tmp_path / "tight"), "--model", str(tiny_clip),
                                "--memory-budget", "10"])
    assert tight.exit_code != 0 and "use --memory-budget" in tight.output
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    not_index = runner.invoke(cli, [*args[:2], "--out", str(notes), "--model", str(tiny_clip)])
    assert not_index.exit_code != 0 and "not a vkd index" in not_index.output


def test_interrupted_run_resumes_from_the_last_commit(tmp_path: Path, tiny_clip: Path) -> None:
    """The state a crash leaves: a manifest missing the last shard, its files and temporaries lying around."""
    images = make_plain_folder(tmp_path / "imgs", 9)
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    build_index(images, out, student=student, shard_size=3)

    def by_id(index: Index) -> dict[str, np.ndarray]:
        return {r["id"]: s.student_vectors([r["row"]])[0] for s in index.shards for r in s.records(range(s.rows))}

    want = by_id(Index.open(out))  # copied out before the test tears a file the snapshot maps
    manifest = read_manifest(out)
    lost = manifest["shards"].pop()  # as if killed before the last commit
    commit_manifest(out, manifest)
    (out / "manifest.json.tmp-12345").write_text("{half a manif")
    (out / "shard-00007.arrow.tmp-12345").write_bytes(b"partial")
    with open(out / lost["arrow"], "r+b") as handle:
        handle.truncate(100)  # a torn write of the unlisted shard

    crashed = Index.open(out)
    assert len(crashed) == 6 and verify_index(out) == []
    resumed = build_index(images, out, student=student, shard_size=3)
    assert resumed.added == 3 and resumed.unchanged == 6
    assert {"manifest.json.tmp-12345", "shard-00007.arrow.tmp-12345"} <= set(resumed.removed_leftovers)
    final = Index.open(out)
    assert verify_index(out) == []
    got = by_id(final)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_measure_indexing_reports_throughput(tmp_path: Path, tiny_clip: Path) -> None:
    from vkd.bench.index import measure_indexing

    images = make_plain_folder(tmp_path / "imgs", 6)
    report = measure_indexing(images, load_encoder(tiny_clip, device="cpu"), batch_size=4, shard_size=4)
    assert report["indexed"] == 6 and report["shards"] == 2 and report["incremental_rerun_added"] == 0
    assert report["encoder_images_per_s"] > 0 and report["indexer_images_per_s"] > 0
    assert report["peak_rss_bytes"] >= report["peak_rss_increase_bytes"] >= 0
    assert report["incremental_rerun_seconds"] > 0 and report["index_bytes"] > 0


def test_stages_run_on_column_batches(tmp_path: Path, tiny_clip: Path) -> None:
    """The batch-shaped stages a distributed engine (Ray Data map_batches) would chain."""
    from vkd.indexer.decode import decode_batch
    from vkd.indexer.encode import EncodeStage
    from vkd.indexer.scan import scan_images
    from vkd.indexer.shards import make_record_batch

    images = make_plain_folder(tmp_path / "imgs", 3)
    (images / "broken.png").write_bytes(b"nope")
    entries, _ = scan_images(images)
    columns = {key: [getattr(e, key) for e in entries] for key in ("path", "abspath", "size", "mtime")}
    decoded = decode_batch(columns)
    assert [e is None for e in decoded["error"]] == [False, True, True, True]  # broken.png sorts first
    stage = EncodeStage(load_encoder(tiny_clip, device="cpu"), batch_size=2)
    encoded = stage(decoded)
    assert encoded["path"] == ["img000.png", "img001.png", "img002.png"] and "image" not in encoded
    np.testing.assert_allclose(encoded["student_vec"], stage.student.encode_images(
        [images / p for p in encoded["path"]]), atol=1e-5)
    encoded["id"] = [e.id for e in entries[1:]]
    batch = make_record_batch(encoded, encoded["student_vec"])
    assert batch.num_rows == 3 and batch.schema.field("student_vec").type.list_size == stage.student.dim
