"""``SearchEngine``: the models and the index behind the HTTP API.

One thread owns the ``Retriever``. It loads the models (the server answers ``/health``
with "loading" meanwhile), then takes search requests from a queue in micro-batches:
the first request waits at most ``batch_window_ms`` for others, and everything queued by
then (up to ``max_batch``) is encoded in one batch per model and searched with one FAISS
call per shard. Model calls are therefore serialised on that thread, and FAISS releases
the GIL there, away from the event loop, which only awaits the results.

Between batches (and every ``reload_interval_s`` when idle) the thread looks at the
manifest's inode, size and mtime; when ``vkd index`` has committed a new one it calls
``Retriever.reload()``. A reader sees only committed manifests (the indexer swaps it
atomically) and each batch reads one snapshot, so no request sees a half-written index.
A reload that fails (say, the index was rebuilt with another student) keeps the old
snapshot in service and is reported by ``/stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.serve.config import ServeConfig
from vkd.serve.files import NotServable, ThumbCache, is_image_id

if TYPE_CHECKING:
    from vkd.indexer import Index
    from vkd.retrieval import Retriever, SearchResult

log = logging.getLogger("uvicorn.error.vkd")

TORCH_STACK = ("torch", "transformers", "peft", "accelerate", "safetensors")
_STOP = object()


class NotReady(Exception):
    """The models are still loading, or failed to load; the message says which."""


class Busy(Exception):
    """The search queue is full."""


@dataclass
class Served:
    """One request's answer: its hits, the snapshot they came from and how it was batched."""

    result: SearchResult
    index: Index
    queue_ms: float
    batch_size: int


@dataclass
class _Job:
    query: Any  # str, an RGB PIL image, or a vkd.retrieval.query.Query (combined terms, filters)
    k: int
    candidates: int
    rerank: bool
    min_score: float | None = None
    mode: str = "two-stage"  # vkd.retrieval.modes.MODES
    future: Future[Served] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> tuple[str, bool, int, str]:
        # One search_batch call takes one k, candidates and rerank. With rerank, stage 1 asks
        # for `candidates` whatever k is and the rerank's order is total, so a request's top k
        # is the prefix of the group's largest k; without it the ANN itself is asked for k
        # (an HNSW search for more neighbours can differ), so k must match. Text and images
        # are kept apart so that a model without an image tower fails image requests only.
        has_images = self.query.has_images if hasattr(self.query, "terms") else not isinstance(self.query, str)
        kind = "image" if has_images else "text"
        return (kind, self.rerank, self.candidates if self.rerank else self.k, self.mode)


class IdTable:
    """Image id -> (shard position, row) over the live rows of one index snapshot.

    Sorted fixed-width byte strings and a binary search: 48 bytes a row, where a dict of
    Python strings would take several times that on a million-image index.
    """

    def __init__(self, index: Index) -> None:
        keys, shards, rows = [], [], []
        for position, shard in enumerate(index.shards):
            live = np.flatnonzero(shard.live_mask())
            ids = np.asarray(shard.table.column("id").to_numpy(zero_copy_only=False)).astype("S32")
            keys.append(ids[live])
            shards.append(np.full(live.size, position, dtype=np.int32))
            rows.append(live.astype(np.int64))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S32")
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.shards = (np.concatenate(shards) if shards else np.zeros(0, np.int32))[order]
        self.rows = (np.concatenate(rows) if rows else np.zeros(0, np.int64))[order]

    def __len__(self) -> int:
        return int(self.keys.size)

    def find(self, image_id: str) -> tuple[int, int] | None:
        key = image_id.encode("ascii")
        at = int(np.searchsorted(self.keys, key))
        if at < self.keys.size and self.keys[at] == key:
            return int(self.shards[at]), int(self.rows[at])
        return None


@dataclass
class Located:
    """An index row to serve a file for."""

    image_id: str
    relpath: str
    images_root: Path
    sha256: str
    width: int | None
    height: int | None
    max_pixels: int | None  # the bound the file was indexed under: its thumbnail is made under it too


def _manifest_stamp(index_dir: Path) -> tuple[int, int, int] | None:
    from vkd.indexer.manifest import MANIFEST_NAME

    try:
        info = os.stat(index_dir / MANIFEST_NAME)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def missing_torch_message(error: ModuleNotFoundError) -> str | None:
    """What to do when a model needs torch and this install has none (a slim ``vkd[serve]``)."""
    if (error.name or "").split(".")[0] not in TORCH_STACK:
        return None
    return (f"a model has no ONNX export and this install has no {error.name} (a `vkd[serve]` install runs "
            "ONNX exports only): export the student and the teacher where vkd[full] is installed (`vkd export "
            "MODEL_DIR` writes MODEL_DIR/onnx, which the server then picks up; for the teacher the text tower "
            "is what the rerank needs), or pass --student/--teacher naming export directories, or install "
            "\"vkd[full]\"")


class SearchEngine:
    """The server's models, index and search queue (see the module docstring).

    ``retriever``: an open ``Retriever`` to serve instead of loading one (tests share one).
    ``on_ready`` / ``on_failure`` are called from the loading thread.
    """

    def __init__(self, config: ServeConfig, *, retriever: Retriever | None = None,
                 on_ready: Callable[[SearchEngine], None] | None = None,
                 on_failure: Callable[[SearchEngine], None] | None = None) -> None:
        self.config = config
        self.state = "loading"
        self.error: str | None = None
        self.started = time.time()
        self.load_seconds: float | None = None
        self.reloads = 0
        self.reload_error: str | None = None
        self.batches = 0
        self.batched_requests = 0
        self.thumbs = ThumbCache(config.thumb_dir)
        self.on_ready = on_ready
        self.on_failure = on_failure
        self._retriever = retriever
        self._ids: tuple[Index, IdTable] | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_queue)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stamp: tuple[int, int, int] | None = None
        self._last_check = 0.0

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Load in the background and then serve the queue; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="vkd-search", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the models are loaded; False on timeout or when loading failed."""
        self._ready.wait(timeout)
        return self.state == "ready"

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)  # blocks only while the queue is full, i.e. while it drains
        self._thread.join(timeout)
        self._thread = None

    def _main(self) -> None:
        if not self._load():
            self._ready.set()
            self._fail_pending()
            return
        self._ready.set()
        self._serve()

    def _load(self) -> bool:
        started = time.perf_counter()
        index_dir = Path(self.config.index)
        try:
            stamp = _manifest_stamp(index_dir)
            retriever = self._retriever or self._open_retriever()
            if len(retriever.index):
                # opens the ONNX sessions and FAISS files now rather than on the first requests
                retriever.search("warm-up", k=1)
                _warm_image_tower(retriever)
            ids = (retriever.index, IdTable(retriever.index))
        except Exception as error:  # any failure here means the server cannot answer searches
            self.error = f"{type(error).__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
            self.state = "failed"
            log.error("vkd serve: cannot load the index or its models: %s", self.error)
            if self.on_failure is not None:
                self.on_failure(self)
            return False
        self._retriever, self._ids, self._stamp = retriever, ids, stamp
        self._last_check = time.monotonic()
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        if self.on_ready is not None:
            self.on_ready(self)
        return True

    def _open_retriever(self) -> Retriever:
        from vkd.retrieval.retriever import Retriever

        config = self.config
        student: Any = config.student
        teacher: Any = config.teacher
        if config.precision is not None and config.prefer == "onnx":
            student, teacher = _with_precision(config, student, teacher)
        try:
            return Retriever(config.index, student=student, teacher=teacher,
                             candidates=config.candidates, prefer=config.prefer, rerank=True)
        except ModuleNotFoundError as error:
            message = missing_torch_message(error)
            if message is None:
                raise
            raise RuntimeError(message) from error

    # -- the search thread -------------------------------------------------------------

    def _serve(self) -> None:
        window = self.config.batch_window_ms / 1000.0
        interval = self.config.reload_interval_s or None
        while True:
            try:
                job = self._queue.get(timeout=interval)
            except queue.Empty:
                self._maybe_reload()
                continue
            if job is _STOP:
                break
            jobs, stop = [job], False
            deadline = time.monotonic() + window
            while len(jobs) < self.config.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    following = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is _STOP:
                    stop = True
                    break
                jobs.append(following)
            self._maybe_reload()
            self._run(jobs)
            if stop:
                break
        self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReady(self.error or "the server is shutting down"))

    def _run(self, jobs: list[_Job]) -> None:
        from vkd.retrieval.results import SearchResult
        from vkd.retrieval.retriever import cut_min_score

        retriever = self._retriever
        assert retriever is not None
        # a request whose client went away was cancelled: it is not searched
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        groups: dict[tuple[str, bool, int, str], list[_Job]] = {}
        for job in live:
            groups.setdefault(job.group, []).append(job)
        for group in groups.values():
            started = time.perf_counter()
            first = group[0]
            index = retriever.index  # the snapshot search_batch reads: reloads happen on this thread only
            try:
                results = retriever.search_batch([job.query for job in group], max(job.k for job in group),
                                                 rerank=first.rerank, candidates=first.candidates,
                                                 mode=first.mode)
            except BaseException as error:  # handed to each request; the thread goes on
                for job in group:
                    job.future.set_exception(error)
                continue
            self.batches += 1
            self.batched_requests += len(group)
            for job, result in zip(group, results, strict=True):
                own = cut_min_score(SearchResult(list(result)[: job.k], query=result.query, timings=result.timings,
                                                 reranked=result.reranked, candidates=result.candidates,
                                                 mode=result.mode),
                                    job.min_score)
                job.future.set_result(Served(own, index, (started - job.enqueued) * 1000.0, len(group)))

    def _maybe_reload(self) -> None:
        interval = self.config.reload_interval_s
        now = time.monotonic()
        if not interval or now - self._last_check < interval:
            return
        self._last_check = now
        stamp = _manifest_stamp(Path(self.config.index))
        if stamp is None or stamp == self._stamp:
            return
        retriever = self._retriever
        assert retriever is not None
        try:
            if retriever.reload():
                self._ids = (retriever.index, IdTable(retriever.index))
                self.reloads += 1
                log.info("vkd serve: index reloaded: %d images in %d shard(s)", len(retriever.index),
                         len(retriever.index.shards))
            self.reload_error = None
        except Exception as error:  # the previous snapshot stays in service
            self.reload_error = f"{type(error).__name__}: {error}"
            log.warning("vkd serve: the index changed but cannot be reloaded (%s); still serving the previous "
                        "version", self.reload_error)
        self._stamp = stamp  # a failed reload is retried when the manifest changes again

    # -- what the routes call ---------------------------------------------------------

    def submit(self, query: Any, *, k: int, candidates: int, rerank: bool,
               min_score: float | None = None, mode: str = "two-stage") -> Future[Served]:
        """Queue one search; the future holds its ``Served`` answer or the error."""
        if self.state != "ready":
            raise NotReady(self.not_ready_detail())
        job = _Job(query, k, candidates, rerank, min_score, mode)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.config.max_queue} searches are already waiting; retry shortly") from None
        return job.future

    async def search(self, query: Any, *, k: int, candidates: int, rerank: bool,
                     min_score: float | None = None, mode: str = "two-stage") -> Served:
        return await asyncio.wrap_future(self.submit(query, k=k, candidates=candidates, rerank=rerank,
                                                     min_score=min_score, mode=mode))

    def not_ready_detail(self) -> str:
        if self.state == "failed":
            return f"the server could not load its index or models: {self.error}"
        return "the server is still loading its models; retry in a few seconds (GET /health says when it is ready)"

    def images_root(self, index: Index) -> Path:
        return Path(self.config.images_root) if self.config.images_root else Path(index.images_root)

    def locate(self, image_id: str) -> Located:
        """The live row with this id, or ``NotServable(404)``; ids not of the indexer's form are
        refused before any lookup."""
        if not is_image_id(image_id):
            raise NotServable(404, "not an image id: ids are the 32 lowercase hex characters that /search "
                                   "results carry")
        ids = self._ids
        if ids is None:
            raise NotReady(self.not_ready_detail())
        index, table = ids
        found = table.find(image_id)
        if found is None:
            raise NotServable(404, "no image with this id in the index (it may have been removed; search again)")
        position, row = found
        record = index.shards[position].records([row])[0]
        bound = (index.manifest.get("build") or {}).get("max_pixels")
        return Located(image_id, record["relpath"], self.images_root(index), str(record.get("sha256") or ""),
                       record.get("width"), record.get("height"), int(bound) if bound else None)

    # -- reporting --------------------------------------------------------------------------

    @property
    def retriever(self) -> Retriever | None:
        return self._retriever if self.state == "ready" else None

    def describe(self) -> dict[str, Any]:
        retriever = self.retriever
        out: dict[str, Any] = {
            "status": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "pid": os.getpid(),
            "torch_loaded": "torch" in sys.modules,
            "index": self.config.index,
        }
        if retriever is None:
            return {**out, "error": self.error}
        index = retriever.index
        out.update({
            "index": str(index.path),
            "images_root": str(self.images_root(index)),
            "rows": index.rows,
            "live_rows": len(index),
            "shards": len(index.shards),
            "updated": index.manifest.get("updated"),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "models": {"student": _model(retriever.student), "teacher": _model(retriever.teacher)},
            "batching": {"window_ms": self.config.batch_window_ms, "max_batch": self.config.max_batch,
                         "batches": self.batches, "queued_now": self._queue.qsize(),
                         "mean_batch_size": round(self.batched_requests / self.batches, 3) if self.batches else None},
            "limits": {"max_k": self.config.max_k, "max_candidates": self.config.max_candidates,
                       "default_candidates": self.config.candidates,
                       "max_upload_bytes": self.config.max_upload_bytes,
                       "max_image_pixels": self.config.max_image_pixels},
            "thumbs": self.thumbs.describe(),
        })
        return out


def _with_precision(config: ServeConfig, student: str | None, teacher: str | None) -> tuple[Any, Any]:
    """The student and teacher as ONNX encoders of ``config.precision`` where they have an
    export (the others stay names, for torch). Encoders passed in are kept across reloads;
    the Retriever still refuses one that no longer matches the index."""
    from vkd.export.onnx_encoder import EXPORT_MANIFEST, OnnxEncoder
    from vkd.indexer.manifest import read_manifest

    manifest = read_manifest(Path(config.index))
    names = [student or manifest["student"]["name"], teacher or (manifest.get("teacher") or {}).get("name")]
    chosen: list[Any] = [student, teacher]
    for position, name in enumerate(names):
        if not name:
            continue
        for candidate in (Path(name), Path(name) / "onnx"):
            if (candidate / EXPORT_MANIFEST).is_file():
                chosen[position] = OnnxEncoder(candidate, precision=config.precision)
                break
    return chosen[0], chosen[1]


def _warm_image_tower(retriever: Retriever) -> None:
    from PIL import Image

    # a text-only export has no image tower: image queries will say so when they come
    with contextlib.suppress(ValueError):
        retriever.search(Image.new("RGB", (64, 64), (128, 128, 128)), k=1)


def _model(encoder: Any) -> dict[str, Any] | None:
    if encoder is None:
        return None
    info = {"name": str(encoder.name), "fingerprint": encoder.fingerprint, "dim": int(encoder.dim),
            "family": getattr(encoder, "family", None), "backend": getattr(encoder, "backend", "torch")}
    if info["backend"] == "onnx":
        info["precision"] = getattr(encoder, "precision", None)
    return info
