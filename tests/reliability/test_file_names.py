"""File names the indexer must take as they are: bytes that are not UTF-8, control characters.

DESIGN.md: paths are stored relative to images_root, names losslessly (a name that is not
valid UTF-8 is still a name). The Arrow ``path`` column stays valid UTF-8 for every reader;
the exact bytes live in ``path_bytes``; vkd gives back the str that opens the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from click.testing import CliRunner
from PIL import Image

from reliability.conftest import noise_image, plain_folder
from vkd.cli import cli
from vkd.indexer import Index, build_index, verify_index
from vkd.indexer.manifest import SKIPPED_NAME, commit_manifest, read_manifest, read_skipped
from vkd.indexer.scan import file_id, scan_images
from vkd.indexer.shards import open_arrow, write_shard

LATIN1 = b"caf\xe9.png"  # "café.png" saved by a Latin-1 system: not valid UTF-8
LATIN1_STR = os.fsdecode(LATIN1)  # how Python names it: "caf\udce9.png"
LOOKALIKE = "caf\\xe9.png"  # a real name, spelled like the readable form of LATIN1


def _build(images: Path, out: Path, model: Path, **options: object):
    return build_index(images, out, student=str(model), device="cpu", workers=1, batch_size=8, **options)


def _save(folder: Path, name: bytes, image: Image.Image) -> str:
    """Save under a name given as bytes; returns the path as the os module spells it."""
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as handle:
        image.save(handle, format="PNG")
    return os.fsdecode(path)


def _arrow_tables(out: Path) -> list[pa.Table]:
    """Every shard read with plain pyarrow, no vkd code."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [ipc.open_file(pa.memory_map(str(out / s["arrow"]), "r")).read_all() for s in manifest["shards"]]


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, dict[bytes, Image.Image]]:
    images = plain_folder(tmp_path / "photos", 3)
    rng = np.random.default_rng(7)
    named = {LATIN1: noise_image(rng), LOOKALIKE.encode(): noise_image(rng), "café.png".encode(): noise_image(rng)}
    for name, image in named.items():
        _save(images, name, image)
    return images, named


def test_file_id_hashes_the_exact_bytes() -> None:
    assert file_id(LATIN1_STR) == hashlib.sha256(LATIN1).hexdigest()[:32]
    assert file_id("a/b.png") == hashlib.sha256(b"a/b.png").hexdigest()[:32]  # ids of existing indexes unchanged
    assert len({file_id(LATIN1_STR), file_id(LOOKALIKE), file_id("café.png")}) == 3


def test_non_utf8_name_is_indexed_searched_and_opened(tmp_path: Path, tiny_clip: Path,
                                                      odd_folder: tuple[Path, dict[bytes, Image.Image]]) -> None:
    images, named = odd_folder
    out = tmp_path / "idx"
    first = _build(images, out, tiny_clip)
    assert (first.added, first.skipped) == (6, 0)
    assert verify_index(out) == []

    # any Arrow reader gets valid UTF-8 in `path` and the exact bytes in `path_bytes`
    (table,) = _arrow_tables(out)
    table.column("path").combine_chunks().validate(full=True)
    paths = table.column("path").to_pylist()
    pairs = sorted(zip(paths, table.column("path_bytes").to_pylist(), strict=True), key=str)
    # the readable form spells undecodable bytes \xNN, so LATIN1 reads like LOOKALIKE: path_bytes tells them apart
    assert pairs == sorted([("caf\\xe9.png", LATIN1), (LOOKALIKE, None), ("café.png", None), ("img000.png", None),
                            ("img001.png", None), ("img002.png", None)], key=str)
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 6 and file_id(LATIN1_STR) in ids

    index = Index.open(out)
    records = index.shards[0].records(np.arange(6))
    by_rel = {r["relpath"]: r for r in records}
    assert set(by_rel) == {LATIN1_STR, LOOKALIKE, "café.png", "img000.png", "img001.png", "img002.png"}
    assert by_rel[LATIN1_STR]["id"] == file_id(LATIN1_STR)
    with open(by_rel[LATIN1_STR]["path"], "rb") as handle:
        assert Image.open(handle).tobytes() == named[LATIN1].tobytes()

    from vkd.retrieval import Retriever

    retriever = Retriever(out, prefer="torch", rerank=False, device="cpu")
    for name, image in named.items():
        top = retriever.search(image, k=3)[0]
        assert os.fsencode(top.path) == os.path.join(os.fsencode(images), name)
        assert Path(top.path).is_file()

    second = _build(images, out, tiny_clip)
    assert (second.unchanged, second.to_encode, second.added, second.retired) == (6, 0, 0, 0)

    os.unlink(os.path.join(os.fsencode(images), LATIN1))
    third = _build(images, out, tiny_clip)
    assert (third.retired, third.unchanged) == (1, 5)
    assert len(Index.open(out)) == 5 and verify_index(out) == []


def test_shards_without_path_bytes_still_read(tmp_path: Path, tiny_clip: Path) -> None:
    """A shard written before the path_bytes column existed: readable, and unchanged on re-run."""
    images = plain_folder(tmp_path / "photos", 3)
    out = tmp_path / "idx"
    _build(images, out, tiny_clip)
    manifest = read_manifest(out)
    entry = manifest["shards"][0]
    table = open_arrow(out / entry["arrow"])
    if "path_bytes" in table.column_names:
        table = table.drop_columns(["path_bytes"])
    old = write_shard(out, entry["name"], table.combine_chunks().to_batches()[0],
                      Index.open(out).shards[0].spec)
    manifest["shards"][0] = old
    commit_manifest(out, manifest)

    assert verify_index(out) == []
    records = Index.open(out).shards[0].records([0, 1, 2])
    assert [r["relpath"] for r in records] == ["img000.png", "img001.png", "img002.png"]
    assert all(Path(r["path"]).is_file() for r in records)
    again = _build(images, out, tiny_clip)
    assert (again.unchanged, again.added, again.retired) == (3, 0, 0)


def test_skipped_names_round_trip_as_strict_json(tmp_path: Path, tiny_clip: Path) -> None:
    images = plain_folder(tmp_path / "photos", 2)
    with open(os.path.join(os.fsencode(images), b"bad\xff.jpg"), "wb") as handle:
        handle.write(b"not an image")
    out = tmp_path / "idx"
    first = _build(images, out, tiny_clip)
    assert (first.added, first.skipped) == (2, 1)

    line = (out / SKIPPED_NAME).read_bytes().decode("utf-8").strip()  # strict UTF-8
    assert "\\ud" not in line.lower()  # no lone surrogates, which strict JSON parsers refuse
    record = json.loads(line)
    assert record["path"] == "bad\\xff.jpg"
    assert base64.b64decode(record["path_base64"]) == b"bad\xff.jpg"
    assert [r.path for r in read_skipped(out)] == [os.fsdecode(b"bad\xff.jpg")]

    second = _build(images, out, tiny_clip)  # the skip is remembered: the file is not retried
    assert (second.unchanged, second.to_encode, second.skipped, second.new_skips) == (2, 0, 1, 0)


def test_garbage_lines_in_skipped_jsonl_do_not_stop_a_run(tmp_path: Path, tiny_clip: Path) -> None:
    images = plain_folder(tmp_path / "photos", 2)
    (images / "text.jpg").write_text("not an image")
    out = tmp_path / "idx"
    _build(images, out, tiny_clip)
    with open(out / SKIPPED_NAME, "ab") as handle:
        handle.write(b'{"path": "caf\xe9.png", "reason": "x"}\n\xff\xfe\x00garbage\n{"path": 5, "reason": 1}\n[]\n')
    assert [r.path for r in read_skipped(out)] == ["text.jpg"]  # good lines survive their neighbours
    (images / "new.png").write_bytes((images / "img000.png").read_bytes())
    again = _build(images, out, tiny_clip)
    assert (again.added, again.unchanged, again.skipped) == (1, 2, 1)
    assert [r.path for r in read_skipped(out)] == ["text.jpg"]  # the bad lines were not written back


def test_search_output_escapes_control_characters_and_json_keeps_the_name(tmp_path: Path,
                                                                            tiny_clip: Path) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(3)
    weird = ["two\nlines.png", "tab\there.png", "bell\a.png", os.fsdecode(LATIN1)]
    for name in weird:
        _save(images, os.fsencode(name), noise_image(rng))
    out = tmp_path / "idx"
    _build(images, out, tiny_clip)
    runner = CliRunner()
    args = ["search", "anything", "--index", str(out), "-k", "4", "--prefer", "torch", "--no-rerank"]
    text = runner.invoke(cli, args, catch_exceptions=False)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len(lines) == 5  # the header and one line per hit, whatever the names hold
    shown = {line.split(maxsplit=3)[3] for line in lines[1:]}
    assert shown == {str(images / n) for n in ("two\\nlines.png", "tab\\there.png", "bell\\x07.png",
                                               "caf\\xe9.png")}

    as_json = runner.invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert as_json.exit_code == 0, as_json.output
    hits = json.loads(as_json.stdout)["hits"]
    assert {hit["path"] for hit in hits} == {os.path.join(str(images), n) for n in weird}
    help_text = runner.invoke(cli, ["search", "--help"]).output
    assert "escaped" in help_text and "--json" in help_text


def test_scan_keeps_non_utf8_names(tmp_path: Path) -> None:
    _save(tmp_path, LATIN1, noise_image(np.random.default_rng(0)))
    entries, skipped = scan_images(tmp_path)
    assert skipped == [] and [e.path for e in entries] == [LATIN1_STR]
    assert os.path.isfile(entries[0].abspath)
