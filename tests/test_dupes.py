"""``vkd dupes``: exact copies by hash, near copies by student ANN + stored teacher cosine.

The tiny random models squeeze every picture into a narrow cone (unrelated pictures score up
to ~0.998 here, a resized copy ~1.0), so the tests use ``THRESHOLD`` = 0.999 where a trained
model's default of 0.95 applies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vkd.cli import cli
from vkd.indexer import build_index
from vkd.indexer.dupes import find_duplicates
from vkd.models import load_encoder

THRESHOLD = 0.999


def _picture(rng: np.random.Generator, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A smooth random picture (coarse noise upsampled): it survives resizing and JPEG, as photos do."""
    coarse = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """8 unrelated pictures; an exact copy of one, an 80% re-encoded JPEG of another."""
    rng = np.random.default_rng(7)
    root = tmp_path / "photos"
    (root / "backup").mkdir(parents=True)
    for i in range(8):
        _picture(rng).save(root / f"p{i}.png")
    shutil.copy(root / "p0.png", root / "backup" / "p0.png")
    with Image.open(root / "p1.png") as original:
        original.resize((77, 64), Image.Resampling.LANCZOS).save(root / "p1_small.jpg", quality=85)
    return root


def test_exact_and_near_copies_are_grouped_and_unrelated_images_are_not(
        folder: Path, tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    out = tmp_path / "idx"
    build_index(folder, out, student=load_encoder(tiny_clip, device="cpu"),
                teacher=load_encoder(tiny_clip_teacher, device="cpu"), shard_size=4)  # copies across shards
    groups = find_duplicates(out, threshold=THRESHOLD, k=5)
    found = {tuple(m.relpath for m in g.members): g for g in groups}
    assert set(found) == {("backup/p0.png", "p0.png"), ("p1.png", "p1_small.jpg")}, [
        (g.kind, g.score, [m.relpath for m in g.members]) for g in groups]
    exact, near = found[("backup/p0.png", "p0.png")], found[("p1.png", "p1_small.jpg")]
    assert (exact.kind, exact.score, exact.measure) == ("exact", 1.0, "sha256")
    assert near.kind == "near" and near.measure == "teacher cosine" and THRESHOLD <= near.score <= 1.0001
    assert near.members[1].width == 77

    # student-only index: the same groups, measured on student vectors
    student_only = tmp_path / "student-only"
    build_index(folder, student_only, student=load_encoder(tiny_clip, device="cpu"))
    groups = find_duplicates(student_only, threshold=THRESHOLD)
    assert {tuple(m.relpath for m in g.members) for g in groups} == set(found)
    assert {g.measure for g in groups} == {"sha256", "student cosine"}
    # a threshold of 1 leaves only the exact copies
    assert [g.kind for g in find_duplicates(out, threshold=1.0)] == ["exact"]
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(out, threshold=2.0)


def test_cli_prints_text_json_and_html(folder: Path, tmp_path: Path, tiny_clip: Path) -> None:
    out = tmp_path / "idx"
    build_index(folder, out, student=load_encoder(tiny_clip, device="cpu"))
    runner = CliRunner()
    text = runner.invoke(cli, ["dupes", "--index", str(out), "--threshold", str(THRESHOLD)])
    assert text.exit_code == 0, text.output
    paragraphs = [p.splitlines() for p in text.stdout.strip().split("\n\n")]
    assert sorted(sorted(Path(line).name for line in p) for p in paragraphs) == [
        ["p0.png", "p0.png"], ["p1.png", "p1_small.jpg"]]
    assert all(Path(line).is_absolute() and Path(line).is_file() for p in paragraphs for line in p)
    assert "2 group(s)" in text.stderr

    as_json = runner.invoke(cli, ["dupes", "--index", str(out), "--threshold", str(THRESHOLD), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert sorted(g["kind"] for g in data["groups"]) == ["exact", "near"]
    assert all(len(g["members"]) == 2 and g["members"][0]["sha256"] for g in data["groups"])

    page = tmp_path / "dupes.html"
    written = runner.invoke(cli, ["dupes", "--index", str(out), "--threshold", str(THRESHOLD), "--html", str(page)])
    assert written.exit_code == 0, written.output
    content = page.read_text()
    assert content.count("data:image/jpeg;base64,") == 4 and "p1_small.jpg" in content
    assert "src='http" not in content and "<link" not in content  # self-contained

    missing = runner.invoke(cli, ["dupes", "--index", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "no index at" in missing.output
