"""The EXIF capture date, read once at index time into the shard's ``captured`` column."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from PIL import Image

from vkd.data.images import capture_time, parse_exif_datetime
from vkd.indexer import Index, build_index, verify_index
from vkd.indexer.manifest import commit_manifest, read_manifest
from vkd.indexer.shards import CAPTURED_COLUMN, captured_values, write_shard
from vkd.models import load_encoder

EXIF_IFD, DATE_TIME, ORIGINAL, DIGITIZED, OFFSET_ORIGINAL = 0x8769, 0x0132, 0x9003, 0x9004, 0x9011


def _ns(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return int(moment.timestamp()) * 10**9


def _jpeg(path: Path, seed: int, *, top: dict[int, str] | None = None, inner: dict[int, str] | None = None) -> Path:
    """A noise JPEG with the given IFD0 (``top``) and EXIF-IFD (``inner``) string tags."""
    exif = Image.Exif()
    for tag, value in (top or {}).items():
        exif[tag] = value
    if inner:
        ifd = exif.get_ifd(EXIF_IFD)
        for tag, value in inner.items():
            ifd[tag] = value
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif)
    return path


def test_parse_exif_datetime_reads_the_wall_clock_as_utc_and_applies_an_offset() -> None:
    assert parse_exif_datetime("2021:07:04 15:30:00") == _ns("2021-07-04 15:30:00")
    assert parse_exif_datetime(b"2021:07:04 15:30:00\x00") == _ns("2021-07-04 15:30:00")
    assert parse_exif_datetime("2021:07:04 15:30:00", "+02:00") == _ns("2021-07-04 13:30:00")
    assert parse_exif_datetime("2021:07:04 15:30:00", "-05:30") == _ns("2021-07-04 21:00:00")
    assert parse_exif_datetime("2021:07:04 15:30:00", "junk") == _ns("2021-07-04 15:30:00")
    for broken in ("", "    :  :     :  :  ", "0000:00:00 00:00:00", "2021:13:45 99:00:00", "yesterday", None, 42):
        assert parse_exif_datetime(broken) is None, broken


def test_capture_time_prefers_original_then_digitized_then_datetime(tmp_path: Path) -> None:
    both = _jpeg(tmp_path / "a.jpg", 0, top={DATE_TIME: "2020:01:01 00:00:00"},
                 inner={ORIGINAL: "2019:05:06 07:08:09", DIGITIZED: "2019:05:06 07:08:10"})
    digitized = _jpeg(tmp_path / "b.jpg", 1, top={DATE_TIME: "2020:01:01 00:00:00"},
                      inner={DIGITIZED: "2019:05:06 07:08:10"})
    plain = _jpeg(tmp_path / "c.jpg", 2, top={DATE_TIME: "2020:01:01 00:00:00"})
    broken_original = _jpeg(tmp_path / "d.jpg", 3, top={DATE_TIME: "2020:01:01 00:00:00"},
                            inner={ORIGINAL: "not a date"})
    assert capture_time(Image.open(both)) == _ns("2019-05-06 07:08:09")
    assert capture_time(Image.open(digitized)) == _ns("2019-05-06 07:08:10")
    assert capture_time(Image.open(plain)) == _ns("2020-01-01 00:00:00")
    assert capture_time(Image.open(broken_original)) == _ns("2020-01-01 00:00:00")  # falls through
    assert capture_time(Image.new("RGB", (4, 4))) is None


@pytest.fixture
def dated_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg(root / "original.jpg", 0, inner={ORIGINAL: "2021:07:04 15:30:00"})
    _jpeg(root / "zoned.jpg", 1, inner={ORIGINAL: "2021:07:04 15:30:00", OFFSET_ORIGINAL: "+02:00"})
    _jpeg(root / "datetime_only.jpg", 2, top={DATE_TIME: "2018:02:03 04:05:06"})
    _jpeg(root / "none.jpg", 3)
    _jpeg(root / "broken.jpg", 4, inner={ORIGINAL: "2021:99:99 25:61:61"})
    return root


WANT = {"original.jpg": _ns("2021-07-04 15:30:00"), "zoned.jpg": _ns("2021-07-04 13:30:00"),
        "datetime_only.jpg": _ns("2018-02-03 04:05:06"), "none.jpg": None, "broken.jpg": None}


def test_index_stores_the_capture_date_per_row_and_null_when_absent_or_broken(
        dated_folder: Path, tmp_path: Path, tiny_clip: Path) -> None:
    out = tmp_path / "idx"
    result = build_index(dated_folder, out, student=load_encoder(tiny_clip, device="cpu"))
    assert result.added == 5 and result.skipped == 0  # a broken date is a null, never a skip
    manifest = json.loads((out / "manifest.json").read_text())
    table = ipc.open_file(pa.memory_map(str(out / manifest["shards"][0]["arrow"]), "r")).read_all()
    assert table.schema.field(CAPTURED_COLUMN).type == pa.int64() and table.schema.field(CAPTURED_COLUMN).nullable
    got = dict(zip(table.column("path").to_pylist(), table.column(CAPTURED_COLUMN).to_pylist(), strict=True))
    assert got == WANT
    records = Index.open(out).shards[0].records(range(5))
    assert {r["relpath"]: r["captured"] for r in records} == WANT
    assert verify_index(out) == []


def test_a_shard_written_before_the_column_reads_as_null(dated_folder: Path, tmp_path: Path, tiny_clip: Path) -> None:
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    build_index(dated_folder, out, student=student)
    manifest = read_manifest(out)
    entry = manifest["shards"][0]
    table = ipc.open_file(pa.memory_map(str(out / entry["arrow"]), "r")).read_all()
    old = table.drop_columns([CAPTURED_COLUMN])
    rewritten = write_shard(out, "shard-00009", old.combine_chunks().to_batches()[0],
                            Index.open(out).shards[0].spec)
    manifest["shards"] = [rewritten]
    manifest["next_shard"] = 10
    commit_manifest(out, manifest)

    assert verify_index(out) == []
    index = Index.open(out)
    assert all(r["captured"] is None for r in index.shards[0].records(range(5)))
    assert captured_values(index.shards[0].table).null_count == 5
    # an incremental run over it: nothing to do, nothing breaks; a new file gets its date
    _jpeg(dated_folder / "new.jpg", 9, inner={ORIGINAL: "2022:01:01 10:00:00"})
    again = build_index(dated_folder, out, student=student)
    assert (again.added, again.unchanged) == (1, 5)
    index = Index.open(out)
    assert {r["relpath"]: r["captured"] for s in index.shards for r in s.records(range(s.rows))}["new.jpg"] \
        == _ns("2022-01-01 10:00:00")
    assert verify_index(out) == []


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_capture_time_survives_a_broken_exif_block() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert capture_time(Image.open(io.BytesIO(buffer.getvalue()))) is None
