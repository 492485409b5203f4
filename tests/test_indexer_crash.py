"""kill -9 of a real indexing process at random moments: the index always opens and verifies,
and the resumed index equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vkd.indexer import Index, build_index, verify_index
from vkd.models import load_encoder

N_IMAGES = 60
SHARD_SIZE = 5  # several shards, so kills land between, during and after shard commits


def _vectors_by_id(index: Index) -> dict[str, np.ndarray]:
    found = {}
    for shard in index.shards:
        live = np.flatnonzero(shard.live_mask())
        for record, vector in zip(shard.records(live), shard.student_vectors(live), strict=True):
            assert record["id"] not in found
            found[record["id"]] = vector
    return found


def _committed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except FileNotFoundError:
        return 0


def _wait_for(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.002)


def _holds_lock(process: subprocess.Popen, out: Path) -> bool:
    """The writer lock names ``process``: models are loaded and indexing is starting."""
    try:
        return (out / ".lock").read_text().strip() == str(process.pid)
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path: Path, tiny_clip: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")

    build_index(images, tmp_path / "reference", student=load_encoder(tiny_clip, device="cpu"),
                shard_size=SHARD_SIZE, batch_size=2)
    want = _vectors_by_id(Index.open(tmp_path / "reference"))
    assert len(want) == N_IMAGES

    out = tmp_path / "idx"
    command = [sys.executable, "-m", "vkd", "index", str(images), "--model", str(tiny_clip), "--out", str(out),
               "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--workers", "2", "--no-progress",
               "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    moments = random.Random(20240607)
    kills, live_before = 0, 0
    for _ in range(4):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(process, lambda p=process: _holds_lock(p, out))
        # a random moment: after 0-2 more shard commits, then somewhere inside the next shard's work
        target = _committed_shards(out) + moments.randint(0, 2)
        _wait_for(process, lambda t=target: _committed_shards(out) >= t)
        time.sleep(moments.uniform(0.0, 0.15))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        _, stderr = process.communicate(timeout=60)
        assert process.returncode in (0, -signal.SIGKILL), stderr.decode()
        index = Index.open(out)
        assert verify_index(out) == []
        assert len(index) >= live_before  # committed work is never lost
        live_before = len(index)
    assert kills >= 2

    finished = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()
    assert verify_index(out) == []
    final = Index.open(out)
    got = _vectors_by_id(final)
    assert sorted(got) == sorted(want)
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-5)
    listed = {name for shard in final.manifest["shards"] for name in (shard["arrow"], shard["faiss"])}
    assert {p.name for p in out.glob("shard-*")} == listed  # leftovers of killed runs are gone
