"""Links and special files in an image folder: said for what they are, never opened, and
links out of IMAGES_DIR followed only when asked (``--follow-links``)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reliability.conftest import noise_image, plain_folder
from vkd.cli import cli
from vkd.indexer import Index, build_index
from vkd.indexer.manifest import read_manifest
from vkd.indexer.scan import OUTSIDE_REASON, scan_images

OUTSIDE = "symbolic link leads outside IMAGES_DIR (pass --follow-links to index it)"


def _build(images: Path, out: Path, model: Path, **options: object):
    return build_index(images, out, student=str(model), device="cpu", workers=1, batch_size=8, **options)


def _in_thread(work, seconds: float = 120.0):
    """Run ``work`` and fail, rather than hang, if it blocks (as opening a FIFO would)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as error:  # re-raised in the test's thread
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds} s: a special file was opened"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


@pytest.fixture
def special_folder(tmp_path: Path) -> Path:
    images = plain_folder(tmp_path / "photos", 2)
    os.mkfifo(images / "pipe.png")
    os.mkfifo(tmp_path / "outside-pipe")
    os.symlink(images / "pipe.png", images / "pipe-link.jpg")
    os.symlink(tmp_path / "outside-pipe", images / "outside-pipe.jpg")
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", images / "zero.jpg")
    os.mkfifo(images / "fifo-not-an-image")  # not a candidate by name: ignored, as before
    os.symlink("nowhere.png", images / "dangling.png")
    return images


def test_special_files_are_named_for_what_they_are_and_never_opened(special_folder: Path) -> None:
    expected = {"pipe.png": "not a regular file (FIFO)", "pipe-link.jpg": "not a regular file (FIFO)",
                "outside-pipe.jpg": "not a regular file (FIFO)", "dangling.png": "broken or looping symlink"}
    if os.path.exists("/dev/zero"):
        expected["zero.jpg"] = "not a regular file (character device)"
    for follow in (False, True):  # what the target is comes first: following would not make it an image
        entries, skipped = _in_thread(lambda follow=follow: scan_images(special_folder, follow_links=follow))
        assert [e.path for e in entries] == ["img000.png", "img001.png"]
        assert {s.path: s.reason for s in skipped} == expected


def test_a_run_over_special_files_completes_and_lists_them(tmp_path: Path, special_folder: Path,
                                                           tiny_clip: Path) -> None:
    result = _in_thread(lambda: _build(special_folder, tmp_path / "idx", tiny_clip))
    assert result.added == 2 and result.skipped == (5 if os.path.exists("/dev/zero") else 4)
    assert len(Index.open(tmp_path / "idx")) == 2


@pytest.fixture
def linked_folder(tmp_path: Path) -> Path:
    """photos/ with links inside it (kept) and links out of it (a file and a folder)."""
    rng = np.random.default_rng(1)
    images = plain_folder(tmp_path / "photos", 2)
    (images / "album").mkdir()
    noise_image(rng).save(images / "album" / "in.png")
    outside = tmp_path / "elsewhere"
    (outside / "trip").mkdir(parents=True)
    noise_image(rng).save(outside / "far.png")
    noise_image(rng).save(outside / "trip" / "beach.png")
    os.symlink(outside / "far.png", images / "far-link.png")
    os.symlink(outside / "trip", images / "trip")
    os.symlink("album/in.png", images / "in-link.png")  # inside: indexed as before
    os.symlink("album", images / "album-alias")  # a second name for a folder: walked once
    os.symlink("..", images / "album" / "up")  # a loop back to the root: walked once
    return images


def test_links_out_of_the_folder_are_skipped_by_default(linked_folder: Path) -> None:
    entries, skipped = scan_images(linked_folder)
    assert [e.path for e in entries] == ["album/in.png", "img000.png", "img001.png", "in-link.png"]
    assert {s.path: s.reason for s in skipped} == {"far-link.png": OUTSIDE, "trip": OUTSIDE}
    assert OUTSIDE_REASON == OUTSIDE

    followed, skipped = scan_images(linked_folder, follow_links=True)
    assert [e.path for e in followed] == ["album/in.png", "far-link.png", "img000.png", "img001.png", "in-link.png",
                                          "trip/beach.png"]
    assert skipped == []


def test_follow_links_is_an_option_of_the_cli_and_recorded(tmp_path: Path, linked_folder: Path,
                                                         tiny_clip: Path) -> None:
    out = tmp_path / "idx"
    runner = CliRunner()
    base = ["index", str(linked_folder), "--model", str(tiny_clip), "--out", str(out), "--no-progress",
            "--device", "cpu", "--workers", "1", "--json"]
    plain = runner.invoke(cli, base, catch_exceptions=False)
    assert plain.exit_code == 0, plain.output
    assert (json.loads(plain.stdout)["added"], json.loads(plain.stdout)["skipped"]) == (4, 2)
    assert read_manifest(out)["build"]["follow_links"] is False
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"]
               for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert skipped == {"far-link.png": OUTSIDE, "trip": OUTSIDE}

    followed = runner.invoke(cli, [*base, "--follow-links"], catch_exceptions=False)
    assert followed.exit_code == 0, followed.output
    summary = json.loads(followed.stdout)
    assert (summary["added"], summary["unchanged"], summary["skipped"]) == (2, 4, 0)
    assert read_manifest(out)["build"]["follow_links"] is True
    assert "--follow-links" in runner.invoke(cli, ["index", "--help"]).output

    # turning it off again retires what only the links reached
    again = _build(linked_folder, out, tiny_clip)
    assert (again.retired, again.unchanged, again.skipped) == (2, 4, 2)


def test_index_build_takes_follow_links(tmp_path: Path, linked_folder: Path, tiny_clip: Path) -> None:
    index = Index.build(linked_folder, tmp_path / "idx", student=str(tiny_clip), follow_links=True, device="cpu")
    assert len(index) == 6 and index.manifest["build"]["follow_links"] is True
