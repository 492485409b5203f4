"""Disk full and read-only file systems: one line naming the path and the cause, a non-zero
exit, no partial file, and the committed index intact (issue 10, defect 7).

Both need a small file system of their own: a tmpfs mounted for the test. Where this
machine does not allow mounting (not root, no CAP_SYS_ADMIN), the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability.conftest import plain_folder
from vkd.cli import cli
from vkd.indexer import Index, build_index, verify_index
from vkd.retrieval.retriever import Retriever


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = _mount("-t", "tmpfs", "-o", f"size={size}", f"vkd-test-{uuid.uuid4().hex[:8]}", str(path))
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: cannot make a small or read-only file system")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _index_cli(images: Path, out: Path, tiny_clip: Path, *extra: str):
    return CliRunner().invoke(cli, ["index", str(images), "--model", str(tiny_clip), "--out", str(out),
                                    "--no-progress", "--device", "cpu", "--workers", "1", *extra])


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def _no_partial_files(out: Path) -> None:
    manifest = Index.open(out).manifest
    from vkd.indexer.manifest import listed_files

    listed = listed_files(manifest)  # arrow, faiss and teacher ANN files
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name
                 or (p.name.startswith("shard-") and p.name not in listed)]
    assert leftovers == []


def test_disk_full_gives_one_line_and_keeps_the_committed_index(tmp_path: Path, tiny_clip: Path) -> None:
    images = plain_folder(tmp_path / "imgs", 6)
    with _tmpfs(tmp_path / "small", "512k") as disk:
        out = disk / "idx"
        first = _index_cli(images, out, tiny_clip, "--shard-size", "3")
        assert first.exit_code == 0, first.output
        plain_folder(images, 40, seed=3)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill the disk, then give back a few pages
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        os.truncate(filler, filler.stat().st_size - 12 * 1024)
        full = _index_cli(images, out, tiny_clip, "--shard-size", "3")
        _one_line_error(full, "No space left on device", str(out), "--out", "unchanged")
        _no_partial_files(out)
        assert verify_index(out) == [] and len(Index.open(out)) == 6
        assert len(Retriever(out, rerank=False, prefer="torch").search("a photo", k=3)) == 3
        filler.unlink()
        resumed = _index_cli(images, out, tiny_clip, "--shard-size", "3")
        assert resumed.exit_code == 0, resumed.output
        assert len(Index.open(out)) == 40 and verify_index(out) == []


def test_read_only_file_system_gives_one_line_and_still_searches(tmp_path: Path, tiny_clip: Path) -> None:
    images = plain_folder(tmp_path / "imgs", 5)
    with _tmpfs(tmp_path / "ro", "8m") as disk:
        out = disk / "idx"
        build_index(images, out, student=str(tiny_clip), device="cpu", workers=1)
        remount = _mount("-o", "remount,ro", str(disk))
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only here: {remount.stderr.strip()}")
        plain_folder(images, 8, seed=4)
        _one_line_error(_index_cli(images, out, tiny_clip), "Read-only file system", "--out")
        _one_line_error(CliRunner().invoke(cli, ["index", "compact", str(out)]), "Read-only file system")
        _one_line_error(CliRunner().invoke(cli, ["index", "verify", str(out), "--repair"]), "Read-only file system")
        _one_line_error(_index_cli(images, disk / "new-idx", tiny_clip), "Read-only file system", "new-idx")
        assert verify_index(out) == []
        search = CliRunner().invoke(cli, ["search", "a photo", "--index", str(out), "--no-rerank", "-k", "3"])
        assert search.exit_code == 0 and len(search.stdout.strip().splitlines()) == 4, search.output
