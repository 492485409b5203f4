"""Searches running while the index changes under them.

Reader threads search in a loop — a ``Retriever`` opened once, one that ``reload()``s before
every search, a ``Retriever`` opened fresh for every search, and a bare ``Index.open`` +
``Shard.search`` — while the main thread (a) commits new shards with incremental runs,
(b) retires deleted files and compacts, (c) rebuilds the index. No search may fail; every
hit must be a live row, with that path, of the snapshot that produced it; and a reader sees
only committed states, in commit order: never an empty or half-rebuilt index.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reliability.conftest import plain_folder
from vkd.indexer import Index, build_index, compact_index
from vkd.models import load_encoder
from vkd.retrieval import Retriever

SHARD_SIZE = 5
START = 20  # images indexed before the readers start
ADDED = (5, 5)  # images added by each incremental run (one shard each)
DELETED = ("img001.png", "img004.png", "img007.png", "img011.png", "img013.png", "img018.png")
K = 7
QUERIES = ("a photo of colourful noise", "red and green static", "a small square picture", "grain")
MIN_SEARCHES = 320  # over all readers
PHASES = ("start", "add", "delete+compact", "rebuild", "done")




def _close(index: Index) -> None:
    close = getattr(index, "close", None)
    if close is not None:
        close()


def live_rows(index: Index) -> dict[tuple[str, int], str]:
    """(shard name, row) -> absolute path of every live row of a snapshot."""
    found = {}
    for shard in index.shards:
        rows = np.flatnonzero(shard.live_mask())
        for record in shard.records(rows) if rows.size else []:
            found[(shard.name, int(record["row"]))] = record["path"]
    return found


@dataclass
class Reader:
    """One searching thread; what it saw is checked after it stops."""

    kind: str  # once | reload | fresh | raw
    out: Path
    models: tuple[Path, Path]
    phase: list[int]
    stop: threading.Event
    searches: int = 0
    errors: list[str] = field(default_factory=list)
    seen: list[tuple[int, int, int]] = field(default_factory=list)  # (phase at start, at end, live rows)
    ready: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"reader-{self.kind}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            # own encoders: a transformers tokenizer is not safe to share between threads
            student = load_encoder(self.models[0], device="cpu")
            teacher = load_encoder(self.models[1], device="cpu")
            query_vector = student.encode_text([QUERIES[0]])
            retriever = Retriever(self.out, student=student, teacher=teacher) if self.kind in ("once", "reload") \
                else None
            self.ready.set()
            while not self.stop.is_set():
                begun = self.phase[0]
                if self.kind == "raw":
                    count = self._raw_search(query_vector)
                else:
                    if self.kind == "reload":
                        retriever.reload()
                    elif self.kind == "fresh":
                        retriever = Retriever(self.out, student=student, teacher=teacher)
                    snapshot = retriever.index  # what the next search reads (this thread alone reloads)
                    result = retriever.search(QUERIES[self.searches % len(QUERIES)], k=K,
                                              rerank=self.searches % 2 == 0)
                    count = len(snapshot)
                    self._check(snapshot, [(hit.shard, hit.row, hit.path) for hit in result], len(result))
                    if self.kind == "fresh":
                        _close(snapshot)
                self.seen.append((begun, self.phase[0], count))
                self.searches += 1
        except BaseException:
            self.errors.append(traceback.format_exc())
        finally:
            self.ready.set()

    def _raw_search(self, query: np.ndarray) -> int:
        index = Index.open(self.out)
        try:
            hits = []
            for shard in index.shards:
                if not shard.live_rows:
                    continue
                scores, rows = shard.search(query, min(K, shard.live_rows))
                valid = rows[0][rows[0] >= 0]
                assert len(valid) == min(K, shard.live_rows), f"{shard.name}: {rows}"
                hits += [(shard.name, r["row"], r["path"]) for r in shard.records(valid)]
            self._check(index, hits, len(hits), expected=sum(min(K, s.live_rows) for s in index.shards))
            return len(index)
        finally:
            _close(index)

    @staticmethod
    def _check(snapshot: Index, hits: list[tuple[str, int, str]], n_hits: int, expected: int | None = None) -> None:
        assert len(snapshot) > 0, "a search read an empty index"
        want = min(K, len(snapshot)) if expected is None else expected
        assert n_hits == want, f"{n_hits} hits from a snapshot of {len(snapshot)} rows"
        live = live_rows(snapshot)
        for shard, row, path in hits:
            assert live.get((shard, row)) == path, f"hit {shard}[{row}] {path} is not a live row of its snapshot"


def _wait_for_searches(readers: list[Reader], more: int, timeout: float = 60.0) -> None:
    """Let every reader finish ``more`` searches begun after now."""
    targets = [reader.searches + more + 1 for reader in readers]  # +1: the one under way may predate now
    deadline = time.monotonic() + timeout
    while any(r.searches < t and not r.errors for r, t in zip(readers, targets, strict=True)):
        assert time.monotonic() < deadline, "readers stalled"
        time.sleep(0.01)


def _add(images: Path, extra: Path, names: list[str]) -> None:
    for name in names:
        (extra / name).rename(images / f"new-{name}")


def test_searches_while_the_index_grows_shrinks_compacts_and_rebuilds(
        tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path,
        reliability_figures: Callable[..., None]) -> None:
    searches_during_changes(tmp_path, (tiny_clip, tiny_clip_teacher), ADDED, MIN_SEARCHES, reliability_figures)


@pytest.mark.long
def test_searches_while_the_index_changes_long(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path,
                                               reliability_figures: Callable[..., None]) -> None:
    searches_during_changes(tmp_path, (tiny_clip, tiny_clip_teacher), (5, 3, 5, 7, 5, 5, 2, 5), 4000,
                            reliability_figures)


def searches_during_changes(tmp_path: Path, models: tuple[Path, Path], added: tuple[int, ...], min_searches: int,
                            reliability_figures: Callable[..., None]) -> None:
    tiny_clip, tiny_clip_teacher = models
    images = plain_folder(tmp_path / "imgs", START, seed=7)
    extra = plain_folder(tmp_path / "extra", sum(added), seed=8)
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    teacher = load_encoder(tiny_clip_teacher, device="cpu")

    def build(**options: Any) -> None:
        build_index(images, out, student=student, teacher=teacher, shard_size=SHARD_SIZE, batch_size=4,
                    workers=2, **options)

    build()
    phase = [0]
    stop = threading.Event()
    readers = [Reader(kind, out, (tiny_clip, tiny_clip_teacher), phase, stop)
               for kind in ("once", "reload", "fresh", "raw")]
    for reader in readers:
        reader.start()
    for reader in readers:
        assert reader.ready.wait(120)
    started = time.monotonic()
    try:
        _wait_for_searches(readers, 3)
        # (a) incremental runs commit new shards
        phase[0] = 1
        extra_names = sorted(p.name for p in extra.iterdir())
        for n in added:
            _add(images, extra, extra_names[:n])
            extra_names = extra_names[n:]
            build()
            _wait_for_searches(readers, 2)
        # (b) deleted files are retired, then compacted away (their shard files deleted)
        phase[0] = 2
        for name in DELETED:
            (images / name).unlink()
        build()
        _wait_for_searches(readers, 2)
        compact_index(out)
        _wait_for_searches(readers, 2)
        # (c) a rebuild: new shards under new names, one swap at the end
        phase[0] = 3
        build(rebuild=True)
        phase[0] = 4
        deadline = time.monotonic() + 60 + min_searches / 10
        while sum(r.searches for r in readers) < min_searches and time.monotonic() < deadline \
                and not any(r.errors for r in readers):
            time.sleep(0.02)
    finally:
        stop.set()
        for reader in readers:
            reader.thread.join(60)
    seconds = time.monotonic() - started

    errors = [error for reader in readers for error in reader.errors]
    assert not errors, f"{len(errors)} reader(s) failed; the first:\n{errors[0]}"
    total = sum(r.searches for r in readers)
    reliability_figures(concurrent_searches=total, searches_per_reader={r.kind: r.searches for r in readers},
                        concurrent_seconds=round(seconds, 1))
    assert total >= min_searches

    grown = START + sum(added)
    shrunk = grown - len(DELETED)
    # the committed states, in order; a reader that opens anew may only move forward through them
    order = [START]  # each run commits a shard as soon as it is written
    for n in added:
        for start in range(0, n, SHARD_SIZE):
            order.append(order[-1] + min(SHARD_SIZE, n - start))
    order.append(shrunk)
    assert len(set(order)) == len(order) and order[-2] == grown
    allowed = {0: {START}, 1: set(order[:-1]), 2: {grown, shrunk}, 3: {shrunk}, 4: {shrunk}}
    assert Index.open(out).rows == len(Index.open(out)) == shrunk
    for reader in readers:
        counts = [count for _, _, count in reader.seen]
        if reader.kind == "once":
            assert set(counts) == {START}, "a Retriever that never reloads changed its snapshot"
            continue
        for begun, ended, count in reader.seen:
            ok = set().union(*(allowed[p] for p in range(begun, ended + 1)))
            assert count in ok, (f"reader {reader.kind} saw {count} rows during {PHASES[begun]}..{PHASES[ended]}; "
                                 f"the committed states then had {sorted(ok)}")
        positions = [order.index(count) for count in counts]
        assert positions == sorted(positions), f"reader {reader.kind} went back to an older state: {counts}"


def test_an_open_snapshot_outlives_compaction_and_rebuild(tmp_path: Path, tiny_clip: Path,
                                                          tiny_clip_teacher: Path) -> None:
    """Opened, not yet searched (no FAISS file read), then its files are deleted: it still searches."""
    images = plain_folder(tmp_path / "imgs", 10, seed=9)
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    teacher = load_encoder(tiny_clip_teacher, device="cpu")

    def build(**options: Any) -> None:
        build_index(images, out, student=student, teacher=teacher, shard_size=SHARD_SIZE, **options)

    def files(index: Index) -> set[str]:
        from vkd.indexer.manifest import listed_files

        return listed_files(index.manifest)  # arrow, faiss and teacher ANN files

    def searches_all_its_rows(index: Index) -> None:
        live = live_rows(index)
        for shard in index.shards:
            rows = np.flatnonzero(shard.live_mask())
            _, found = shard.search(shard.student_vectors(rows), shard.live_rows)
            assert (found[:, 0] == rows).all()  # each row finds itself first
        assert len(live) == len(index)

    build()
    before = Index.open(out)
    retriever = Retriever(out, student=student, teacher=teacher)
    old_paths = set(live_rows(before).values())
    for name in ("img001.png", "img006.png"):
        (images / name).unlink()
    build()
    compact_index(out)  # rewrites both shards and deletes the files `before` holds
    assert not files(before) & set(p.name for p in out.iterdir())
    searches_all_its_rows(before)
    hits = retriever.search("a photo", k=10)
    assert len(hits) == 10 and {hit.path for hit in hits} == old_paths

    middle = Index.open(out)
    again = Retriever(out, student=student, teacher=teacher)
    build(rebuild=True)
    assert not files(middle) & set(p.name for p in out.iterdir())
    searches_all_its_rows(middle)
    assert len(again.search("a photo", k=10)) == 8

    assert retriever.reload()
    hits = retriever.search("a photo", k=10, rerank=False)
    assert len(hits) == 8 and all(Path(hit.path).is_file() for hit in hits)
    assert set(live_rows(Index.open(out)).values()) == old_paths - {str(images / "img001.png"),
                                                                    str(images / "img006.png")}


def test_index_open_racing_a_compaction_gets_a_whole_snapshot(tmp_path: Path, tiny_clip: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the readers above run into now and then, made certain: a compaction commits and
    deletes a shard's files between ``Index.open`` mapping its Arrow file and opening its FAISS
    file. The open must retry on the new manifest (as it does when an Arrow file is gone), not
    hand out a snapshot whose shard cannot be searched."""
    import vkd.indexer.index as index_module

    images = plain_folder(tmp_path / "imgs", 10, seed=11)
    out = tmp_path / "idx"
    student = load_encoder(tiny_clip, device="cpu")
    build_index(images, out, student=student, shard_size=SHARD_SIZE)
    (images / "img001.png").unlink()
    build_index(images, out, student=student, shard_size=SHARD_SIZE)  # only shard-00000 has a retired row
    real_open_arrow = index_module.open_arrow
    raced: list[Path] = []

    def open_arrow_then_compact(path: Path) -> Any:
        table = real_open_arrow(path)
        if not raced:
            raced.append(path)
            compact_index(out)  # rewrites shard-00000 and deletes its files, the FAISS one not yet opened
        return table

    monkeypatch.setattr(index_module, "open_arrow", open_arrow_then_compact)
    index = Index.open(out)
    assert raced and raced[0].name == "shard-00000.arrow"
    assert len(index) == 9
    for shard in index.shards:
        _, rows = shard.search(shard.student_vectors([0]), 1)
        assert rows[0, 0] == 0
