"""``vkd index --engine ray`` on a local Ray with 2 CPUs, against the single-process indexer.

Same folder, same tiny models: the Ray engine's index holds the same ids and vectors as the
local one, first run and incremental runs (added, changed, deleted files); an encoder actor
killed with SIGKILL mid-run is restarted and its batches retried; a driver killed with kill -9
leaves an index that verifies, and a re-run completes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='needs vkd[ray] (pip install "ray[data]")')
psutil = pytest.importorskip("psutil")

from test_indexer import make_plain_folder  # noqa: E402

from vkd.indexer import Index, build_index, verify_index  # noqa: E402
from vkd.indexer.ray_engine import build_index_ray  # noqa: E402
from vkd.indexer.shards import STUDENT_COLUMN, TEACHER_COLUMN, open_arrow, vector_view  # noqa: E402

pytestmark = pytest.mark.slow

RAY = {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 3, "shard_size": 4}


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray of 2 CPUs for the in-process tests (starting one costs ~10 s)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def live_rows(index_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, Any, str]]:
    """id -> (student vector, teacher vector, captured, path) of every live row."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    rows = {}
    for shard in manifest["shards"]:
        table = open_arrow(index_dir / shard["arrow"])
        student, teacher = vector_view(table, STUDENT_COLUMN), vector_view(table, TEACHER_COLUMN)
        retired = set(shard["retired"])
        for i, (row_id, captured, path) in enumerate(zip(table.column("id").to_pylist(),
                                                         table.column("captured").to_pylist(),
                                                         table.column("path").to_pylist(), strict=True)):
            if row_id not in retired:
                assert row_id not in rows, f"{row_id} live twice"
                rows[row_id] = (student[i], teacher[i], captured, path)
    return rows


def assert_same_index(local: Path, other: Path) -> None:
    assert verify_index(other) == []
    a, b = live_rows(local), live_rows(other)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key][0], b[key][0], atol=1e-5, err_msg=a[key][3])
        # float16 as stored: the same float32 vector rounds to the same half
        np.testing.assert_allclose(a[key][1].astype(np.float32), b[key][1].astype(np.float32), atol=1e-3)
        assert a[key][2:] == b[key][2:]
    skipped_a = sorted(json.loads(line)["path"] for line in (local / "skipped.jsonl").read_text().splitlines())
    skipped_b = sorted(json.loads(line)["path"] for line in (other / "skipped.jsonl").read_text().splitlines())
    assert skipped_a == skipped_b
    assert len(Index.open(other)) == len(Index.open(local))
    # the same vector spaces recorded (the teacher ANN of a new index with a teacher included), and
    # every shard carries the FAISS files its manifest entry names
    vectors = [json.loads((d / "manifest.json").read_text()).get("vectors") for d in (local, other)]
    assert vectors[0] == vectors[1]


def test_ray_engine_matches_local_incremental(local_ray: Any, tmp_path: Path, tiny_clip: Path,
                                              tiny_clip_teacher: Path) -> None:
    images = make_plain_folder(tmp_path / "images", 14)
    (images / "broken.jpg").write_text("not a JPEG")
    models = {"student": tiny_clip, "teacher": tiny_clip_teacher}
    local, remote = tmp_path / "local.vkd", tmp_path / "ray.vkd"

    build_index(images, local, shard_size=4, **models)
    first = build_index_ray(images, remote, **models, **RAY)
    assert first.added == 14 and first.skipped == 1 and first.to_encode == 15
    # a write task takes up to shard_size rows as they come: at least ceil(14 / 4) shards, none larger
    shards = json.loads((remote / "manifest.json").read_text())["shards"]
    assert first.shards_written == len(shards) >= 4 and max(s["rows"] for s in shards) <= 4
    assert "unfinished_run" not in json.loads((remote / "manifest.json").read_text())
    assert_same_index(local, remote)

    # incremental: one file added, one changed, one deleted, the broken one left alone
    make_plain_folder(tmp_path / "more", 2, seed=7)
    os.replace(tmp_path / "more" / "img000.png", images / "new.png")
    os.replace(tmp_path / "more" / "img001.png", images / "img003.png")
    (images / "img005.png").unlink()
    build_index(images, local, shard_size=4, **models)
    again = build_index_ray(images, remote, **models, **RAY)
    assert (again.to_encode, again.added, again.retired, again.unchanged) == (2, 2, 2, 12)
    assert_same_index(local, remote)

    nothing = build_index_ray(images, remote, **models, **RAY)
    assert nothing.to_encode == 0 and nothing.added == 0
    assert_same_index(local, remote)

    # a rebuild publishes once at the end, under new shard names
    rebuilt = build_index_ray(images, remote, rebuild=True, **models, **RAY)
    assert rebuilt.added == 14
    assert_same_index(local, remote)


def _encoder_processes() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EncodeActor" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_killed_encoder_actor_is_retried(local_ray: Any, tmp_path: Path, tiny_clip: Path,
                                         tiny_clip_teacher: Path) -> None:
    images = make_plain_folder(tmp_path / "images", 30)
    models = {"student": tiny_clip, "teacher": tiny_clip_teacher}
    killed: list[int] = []

    def kill_one_actor(manifest: dict[str, Any]) -> None:
        # the first commit: the actors are mid-run with most batches still to encode
        if not killed and manifest["shards"]:
            actors = _encoder_processes()
            assert actors, "no encoder actor process found"
            killed.append(actors[0].pid)
            os.kill(actors[0].pid, signal.SIGKILL)

    result = build_index_ray(images, tmp_path / "ray.vkd", on_commit=kill_one_actor, **models,
                             **{**RAY, "batch_size": 2, "shard_size": 3})
    assert killed, "the run finished before any commit"
    assert result.added == 30
    build_index(images, tmp_path / "local.vkd", shard_size=3, **models)
    assert_same_index(tmp_path / "local.vkd", tmp_path / "ray.vkd")


def test_driver_kill9_leaves_a_sound_index_and_resumes(tmp_path: Path, tiny_clip: Path,
                                                       tiny_clip_teacher: Path) -> None:
    images = make_plain_folder(tmp_path / "images", 40)
    out = tmp_path / "ray.vkd"
    command = [sys.executable, "-m", "vkd", "index", str(images), "--model", str(tiny_clip), "--teacher",
               str(tiny_clip_teacher), "--out", str(out), "--engine", "ray", "--num-workers", "1",
               "--batch-size", "2", "--shard-size", "3", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    driver = psutil.Process(run.pid)
    deadline = time.monotonic() + 240
    family: list[psutil.Process] = []
    try:
        while time.monotonic() < deadline and run.poll() is None:
            manifest = out / "manifest.json"
            if manifest.exists():
                try:
                    if json.loads(manifest.read_text())["shards"]:
                        break
                except (ValueError, KeyError):
                    pass  # read between two commits: atomic replace, so only while it was absent
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before its first commit: {run.stderr.read().decode()[-2000:]}"
        # Ray's own processes (GCS, raylet, workers) are the driver's descendants: end them too, by pid
        family = driver.children(recursive=True)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
    finally:
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
        if run.poll() is None:
            run.kill()
    psutil.wait_procs(family, timeout=30)

    assert verify_index(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unfinished_run"]["engine"] == "ray"
    committed = manifest["live_rows"]
    assert 0 < committed < 40
    assert len(Index.open(out)) == committed

    resumed = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert summary["to_encode"] == 40 - committed and summary["live_rows"] == 40
    build_index(images, tmp_path / "local.vkd", shard_size=3, student=tiny_clip, teacher=tiny_clip_teacher)
    assert_same_index(tmp_path / "local.vkd", out)
    assert "unfinished_run" not in json.loads((out / "manifest.json").read_text())
