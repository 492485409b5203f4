"""Moved, renamed and copied files keep their vectors: matched by content hash, copied from the
Arrow shard, never re-encoded. Encoder calls are counted by wrapping the real encoder's batch
method with a function that calls through (no mocks: the vectors are the real ones)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vkd.cli import cli
from vkd.indexer import Index, build_index, verify_index
from vkd.models import load_encoder
from vkd.models.base import Encoder


class Counted:
    """An encoder whose ``_encode_image_batch`` counts the images it is given, then calls through."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.images = 0
        real = encoder._encode_image_batch

        def counting(images: list, *args: object, **kwargs: object) -> object:
            self.images += len(images)
            return real(images, *args, **kwargs)

        encoder._encode_image_batch = counting  # type: ignore[method-assign]


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "trip").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "trip" / f"img{i}.png")
    return root


def _by_sha(index: Index, column: str = "student") -> dict[str, tuple[str, np.ndarray]]:
    """sha256 -> (relpath, vector) over the live rows."""
    found = {}
    for shard in index.shards:
        live = np.flatnonzero(shard.live_mask())
        vectors = shard.student_vectors(live) if column == "student" else shard.teacher_vectors(live)
        for record, vector in zip(shard.records(live), vectors, strict=True):
            found[record["sha256"]] = (record["relpath"], vector)
    return found


@pytest.fixture
def encoders(tiny_clip: Path, tiny_clip_teacher: Path) -> Iterator[tuple[Counted, Counted]]:
    yield Counted(load_encoder(tiny_clip, device="cpu")), Counted(load_encoder(tiny_clip_teacher, device="cpu"))


def test_a_renamed_folder_is_reindexed_with_no_encode_and_identical_vectors(
        tmp_path: Path, encoders: tuple[Counted, Counted]) -> None:
    student, teacher = encoders
    images = _folder(tmp_path / "photos", 5)
    out = tmp_path / "idx"
    first = build_index(images, out, student=student.encoder, teacher=teacher.encoder, shard_size=3)
    assert first.added == 5 and first.reused == 0 and student.images == teacher.images == 5
    before = Index.open(out)
    want_student, want_teacher = _by_sha(before), _by_sha(before, "teacher")
    before_rows = {r["sha256"]: r for s in before.shards for r in s.records(range(s.rows))}

    os.rename(images / "trip", images / "holiday 2024")
    second = build_index(images, out, student=student.encoder, teacher=teacher.encoder, shard_size=3)
    assert (second.added, second.reused, second.retired, second.encoded) == (5, 5, 5, 0)
    assert student.images == teacher.images == 5  # not one more image through either model
    after = Index.open(out)
    assert len(after) == 5 and verify_index(out) == []
    got_student, got_teacher = _by_sha(after), _by_sha(after, "teacher")
    assert sorted(got_student) == sorted(want_student)
    for sha, (path, vector) in got_student.items():
        assert path.startswith("holiday 2024/")
        np.testing.assert_array_equal(vector, want_student[sha][1])
        np.testing.assert_array_equal(got_teacher[sha][1], want_teacher[sha][1])
    for shard in after.shards:
        for record in shard.records(np.flatnonzero(shard.live_mask())):
            old = before_rows[record["sha256"]]
            assert (record["width"], record["height"], record["captured"]) == (old["width"], old["height"],
                                                                                old["captured"])
    # the new rows search like the old ones did: each finds itself first
    shard = after.shards[-1]
    _, rows = shard.search(shard.student_vectors([0]), 1)
    assert rows[0, 0] == 0


def test_a_copied_file_and_a_file_that_comes_back_later_are_reused(
        tmp_path: Path, encoders: tuple[Counted, Counted]) -> None:
    student, _ = encoders
    images = _folder(tmp_path / "photos", 3)
    out = tmp_path / "idx"
    build_index(images, out, student=student.encoder)
    assert student.images == 3

    # a copy: the original stays, so its row stays live; the copy takes its vectors
    shutil.copy2(images / "trip" / "img0.png", images / "copy of img0.png")
    copied = build_index(images, out, student=student.encoder)
    assert (copied.added, copied.reused, copied.retired, copied.unchanged) == (1, 1, 0, 3)
    assert student.images == 3
    index = Index.open(out)
    paths = {r["relpath"]: s.student_vectors([r["row"]])[0] for s in index.shards
             for r in s.records(np.flatnonzero(s.live_mask()))}
    np.testing.assert_array_equal(paths["copy of img0.png"], paths["trip/img0.png"])

    # a file deleted in one run comes back in a later one (under a new name): its retired row
    # still holds the vectors
    gone = images / "trip" / "img1.png"
    kept = tmp_path / "img1.png"
    shutil.move(gone, kept)
    assert build_index(images, out, student=student.encoder).retired == 1
    shutil.move(kept, images / "back.png")
    back = build_index(images, out, student=student.encoder)
    assert (back.added, back.reused) == (1, 1) and student.images == 3
    assert verify_index(out) == []

    # a new image with the size of a stored one is hashed, found new, and encoded
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / "fresh.png")
    fresh = build_index(images, out, student=student.encoder)
    assert (fresh.added, fresh.reused) == (1, 0) and student.images == 4


def test_cli_reports_reused_in_the_summary_and_json(tmp_path: Path, tiny_clip: Path) -> None:
    images = _folder(tmp_path / "photos", 2)
    out = tmp_path / "idx"
    runner = CliRunner()
    args = ["index", str(images), "--model", str(tiny_clip), "--out", str(out), "--no-progress", "--device", "cpu"]
    assert runner.invoke(cli, args).exit_code == 0
    os.rename(images / "trip", images / "moved")
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["added"], summary["reused"], summary["encoded"], summary["retired"]) == (2, 2, 0, 2)
    os.rename(images / "moved", images / "again")
    text = runner.invoke(cli, args)
    assert text.exit_code == 0 and "2 reused" in text.output, text.output


def test_a_rename_interrupted_after_one_shard_resumes_by_reuse(
        tmp_path: Path, encoders: tuple[Counted, Counted]) -> None:
    """The state a kill leaves mid-rename: the first new shard committed (its old rows retired),
    the rest not. The next run copies the remaining vectors from the retired rows too."""
    from vkd.indexer.manifest import commit_manifest, read_manifest

    student, _ = encoders
    images = _folder(tmp_path / "photos", 6)
    out = tmp_path / "idx"
    build_index(images, out, student=student.encoder, shard_size=2)
    want = {sha: vector for sha, (_, vector) in _by_sha(Index.open(out)).items()}
    os.rename(images / "trip", images / "moved")
    build_index(images, out, student=student.encoder, shard_size=2)
    manifest = read_manifest(out)
    # as if killed before the last two commits: their shards unlisted, and the old rows those
    # commits retired still live
    lost = {sha for shard in Index.open(out).shards[-2:] for sha in shard.table.column("sha256").to_pylist()}
    manifest["shards"] = manifest["shards"][:-2]
    for shard in Index.open(out).shards[:3]:
        back = {row_id for row_id, sha in zip(shard.table.column("id").to_pylist(),
                                              shard.table.column("sha256").to_pylist(), strict=True) if sha in lost}
        entry = next(e for e in manifest["shards"] if e["name"] == shard.name)
        entry["retired"] = sorted(set(entry["retired"]) - back)
    commit_manifest(out, manifest)
    interrupted = Index.open(out)
    assert len(interrupted) == 6 and sum(r["relpath"].startswith("moved/") for s in interrupted.shards
                                         for r in s.records(np.flatnonzero(s.live_mask()))) == 2
    assert verify_index(out) == []

    resumed = build_index(images, out, student=student.encoder, shard_size=2)
    assert resumed.encoded == 0 and student.images == 6
    final = _by_sha(Index.open(out))
    assert sorted(final) == sorted(want) and all(path.startswith("moved/") for path, _ in final.values())
    for sha, (_, vector) in final.items():
        np.testing.assert_array_equal(vector, want[sha])
    assert verify_index(out) == []
