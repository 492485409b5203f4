"""The teacher cache across processes: each rank (each run) appends segments of its own, a
reader reads them all, and writers at the same moment never lose each other's rows.

The processes are real (multiprocessing, and torch.distributed over gloo for ranks): the
version 2 cache rewrote one file at each flush, and two writers racing on it lost the rows of
the one whose rename came first. These tests fail on that design.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vkd.distill.teacher import CACHE_FORMAT, TeacherCache

DIM = 8
ROUNDS = 12
PER_ROUND = 5


def _cache(directory: Path) -> TeacherCache:
    return TeacherCache(directory, fingerprint="fp0", dim=DIM, logit_scale=14.3, teacher="tiny")


def _vectors(key: str) -> tuple[np.ndarray, np.ndarray]:
    # a row's value follows from its key, so a reader can check every row it finds
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    return rng.standard_normal((1, DIM)).astype(np.float32), rng.standard_normal((1, DIM)).astype(np.float32)


def _keys(writer: int, round_index: int) -> list[str]:
    own = [f"w{writer}-r{round_index}-{j}" for j in range(PER_ROUND)]
    return [*own, f"shared-r{round_index}"]  # every writer computes this one: it must not matter


def _writer(directory: str, writer: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    cache = _cache(Path(directory))
    barrier.wait()  # both start together: their flushes interleave
    for round_index in range(ROUNDS):
        keys = _keys(writer, round_index)
        text = np.concatenate([_vectors(k)[0] for k in keys])
        image = np.concatenate([_vectors(k)[1] for k in keys])
        cache.add(keys, text, image)
        cache.flush()


def _expected(writers: int) -> set[str]:
    return {key for w in range(writers) for r in range(ROUNDS) for key in _keys(w, r)}


def _check_rows(cache: TeacherCache, keys: set[str]) -> None:
    assert cache.keys() >= keys, f"lost rows: {sorted(keys - cache.keys())[:5]}"
    ordered = sorted(keys)
    text, image = cache.lookup(ordered)
    for i, key in enumerate(ordered):
        want_text, want_image = _vectors(key)
        np.testing.assert_array_equal(text[i], want_text[0])
        np.testing.assert_array_equal(image[i], want_image[0])


def _write_v2(path: Path, keys: list[str]) -> None:
    """A cache file as vkd wrote it before segments (version 2, one file)."""
    meta = {"format": CACHE_FORMAT, "version": "2", "fingerprint": "fp0", "teacher": "tiny", "dim": str(DIM),
            "logit_scale": "14.3"}
    vector = pa.list_(pa.float32(), DIM)
    schema = pa.schema([("key", pa.string()), ("text", vector), ("image", vector)], metadata=meta)
    text = np.concatenate([_vectors(k)[0] for k in keys])
    image = np.concatenate([_vectors(k)[1] for k in keys])
    table = pa.table({"key": keys, "text": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), DIM),
                      "image": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), DIM)}, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two runs share a cache directory holding a version 2 file; both flush 12 times at
    once; a reader then finds the old file's rows and every row of both."""
    old_keys = [f"v2-{i}" for i in range(7)]
    _write_v2(tmp_path / "fp0.arrow", old_keys)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_writer, args=(str(tmp_path), w, barrier)) for w in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0

    reader = _cache(tmp_path)
    _check_rows(reader, _expected(2) | set(old_keys))
    assert len(reader) == len(_expected(2)) + len(old_keys)
    # append-only: the version 2 file is read, never rewritten; the rest are per-writer segments
    assert (tmp_path / "fp0.arrow").is_file()
    segments = reader.segment_files()[1:]
    assert {name.split("-")[2] for name in (p.name for p in segments)} == {str(p.pid) for p in processes}
    assert not list((tmp_path / "fp0").glob(".*"))  # no temporary left behind


def _rank_main(rank: int, world: int, directory: str, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("the cache must not gather rows across ranks")

        dist.all_gather_object = forbidden  # type: ignore[assignment]
        cache = _cache(Path(directory))
        for round_index in range(3):
            keys = _keys(rank, round_index)
            cache.add(keys, np.concatenate([_vectors(k)[0] for k in keys]),
                      np.concatenate([_vectors(k)[1] for k in keys]))
            cache.flush()
            # after the collective flush, every rank sees every rank's rows so far
            seen = {key for w in range(world) for r in range(round_index + 1) for key in _keys(w, r)}
            _check_rows(cache, seen)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_writes_its_own_segment(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path / "cache"), str(tmp_path / "init")), nprocs=2, join=True)
    reader = _cache(tmp_path / "cache")
    expected = {key for w in range(2) for r in range(3) for key in _keys(w, r)}
    _check_rows(reader, expected)
    ranks = {p.name.split("-")[3] for p in reader.segment_files()}
    assert ranks == {"r0", "r1"}
