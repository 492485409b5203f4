"""Running the stages: scan → decode → encode → write shard → commit manifest.

Each stage is a plain function over a batch (``scan.scan_images``, ``decode.decode_file`` /
``decode.decode_batch``, ``encode.EncodeStage``, ``shards.write_shard``,
``manifest.commit_manifest``), so a distributed engine can run the same code: with Ray Data,
``ds.map_batches(decode_batch)`` → ``ds.map_batches(EncodeStage, ...)`` → one writer per
shard. Locally, ``build_index`` runs them as a pipeline:

* decoding in a thread pool (PIL releases the GIL while it decodes), a bounded window of
  files ahead of the encoder, so the encoder always has the next batch ready and memory stays
  bounded by ``prefetch`` decoded images;
* encoding in the calling thread, ``batch_size`` images at a time;
* writing the finished shard (Arrow, FAISS build, checksums) and committing the manifest in a
  single writer thread, while the next shard is already being decoded and encoded.

A shard is committed as soon as it is written, so a run killed at any moment loses at most
the shards in flight; the next run skips every file already in a committed shard.

Moved, renamed and copied files keep their vectors: a vector depends only on the file's bytes
and the models, and every row of the committed shards (live, retired, or being retired by this
run because its file moved away) records the sha256 of its file. A file to index whose size
equals some stored row's is hashed first (streamed, in the decode threads); when the hash is
stored, its student and teacher vectors, width, height and capture time are copied from that
Arrow row into the new shard, and the file is neither decoded nor encoded (with an 8B teacher
that is seconds instead of hours for a reorganised library). The copy goes through the same
shard write and manifest commit as an encoded row, so a crash loses nothing more than before.
A ``--rebuild`` re-encodes everything: that is what it is for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vkd.data.images import ImageError, file_sha256, read_image_file
from vkd.indexer.decode import DEFAULT_MAX_PIXELS, Decoded, decode_file, pixel_guard
from vkd.indexer.encode import EncodeStage, backend_label
from vkd.indexer.faiss_index import (
    INDEX_TYPES,
    BudgetTooSmallError,
    IndexSpec,
    choose_index,
    split_share,
    teacher_ann_dim,
)
from vkd.indexer.fsutil import TMP_MARKER, atomic_write, writer_lock
from vkd.indexer.manifest import (
    MANIFEST_NAME,
    SHARD_FILE,
    SKIPPED_NAME,
    ManifestError,
    commit_manifest,
    model_record,
    new_manifest,
    read_manifest,
    read_skipped,
    remove_unlisted,
    vector_spaces,
    write_skipped,
)
from vkd.indexer.scan import FileEntry, SkipRecord, scan_images
from vkd.indexer.shards import (
    ANN_FILES,
    CAPTURED_COLUMN,
    PROJECTED_COLUMN,
    STUDENT_COLUMN,
    TEACHER_ANN,
    TEACHER_COLUMN,
    arrow_bytes,
    captured_values,
    make_record_batch,
    now_iso,
    open_arrow,
    relative_paths,
    shard_name,
    vector_array,
    vector_view,
    write_ann,
    write_shard,
)
from vkd.indexer.verify import repair_shards

if TYPE_CHECKING:
    from vkd.models.base import Encoder

INDEX_SUFFIX = ".vkd"
# besides shards and the manifest: the skip list, the writer lock, and `vkd serve`'s thumbnail cache
INDEX_OWN_NAMES = (SKIPPED_NAME, ".lock", "thumbs")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class IndexMismatchError(ValueError):
    """The index on disk was built with other models or from another folder."""


def default_out_dir(images_dir: str | os.PathLike[str]) -> Path:
    """``photos/`` → ``photos.vkd/`` next to it: outside the scanned tree, easy to find."""
    root = Path(images_dir).expanduser().resolve()
    return root.with_name(root.name + INDEX_SUFFIX)


def parse_bytes(value: int | str | None) -> int | None:
    """``4GB``, ``512MiB``, ``1e9`` or an int → bytes (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"memory budget {value!r}: expected a size such as 2GB, 512MiB or 1000000000")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class BuildResult:
    index_dir: Path
    scanned: int = 0
    unchanged: int = 0
    to_encode: int = 0
    added: int = 0
    retired: int = 0
    skipped: int = 0
    new_skips: int = 0
    shards_written: int = 0
    #: of ``added``, rows whose vectors were copied from a stored row with the same file hash
    #: (moved, renamed or copied files) instead of being encoded
    reused: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    #: time the encoder waited for decoded images (0 when decoding keeps up)
    starved_seconds: float = 0.0
    #: how each model ran (``backend_label``: "onnx int8", "torch float32 cpu"; None: no teacher)
    student_backend: str | None = None
    teacher_backend: str | None = None
    removed_leftovers: list[str] = field(default_factory=list)
    #: shards whose FAISS file was rebuilt from the Arrow shard, or that were dropped for re-encoding
    repaired: list[str] = field(default_factory=list)
    #: committed shards that gained projected vectors or a teacher ANN index from their stored
    #: vectors (``--projected`` / ``--teacher-ann`` on an existing index; no model ran for them)
    upgraded: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.to_encode / self.seconds if self.seconds > 0 else 0.0

    @property
    def encoded(self) -> int:
        """Rows the models encoded in this run (``added`` less ``reused``)."""
        return self.added - self.reused

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "index_dir"}
        data["index_dir"] = str(self.index_dir)
        data["images_per_s"] = self.images_per_s
        data["encoded"] = self.encoded
        return data


@dataclass
class _Live:
    shard: str
    id: str
    size: int
    mtime: int


@dataclass
class _Plan:
    todo: list[FileEntry]
    unchanged: int
    old_rows: dict[str, _Live]  # path -> row to retire when the path is re-processed
    deleted: dict[str, list[str]]  # shard -> ids whose files are gone
    kept_skips: list[SkipRecord]


def _live_rows(index_dir: Path, manifest: dict[str, Any]) -> dict[str, _Live]:
    live: dict[str, _Live] = {}
    for entry in manifest["shards"]:
        table = open_arrow(index_dir / entry["arrow"])
        retired = set(entry["retired"])
        # keyed by the path the scan gives (exact bytes), not the `path` column's readable text
        for row_id, path, size, mtime in zip(table.column("id").to_pylist(), relative_paths(table),
                                             table.column("size").to_pylist(), table.column("mtime").to_pylist(),
                                             strict=True):
            if row_id not in retired:
                live[path] = _Live(entry["name"], row_id, size, mtime)
    return live


def plan_run(index_dir: Path, manifest: dict[str, Any], entries: Sequence[FileEntry],
             max_pixels: int, previous_skips: Sequence[SkipRecord] = ()) -> _Plan:
    """Which files need encoding: new ones, and ones whose size or mtime changed.

    A file in ``previous_skips`` (the last run's ``skipped.jsonl``) is not retried until it
    changes or the pixel bound grows."""
    live = _live_rows(index_dir, manifest)
    previous_skips = {record.path: record for record in previous_skips}
    todo, kept, old_rows, unchanged = [], [], {}, 0
    seen = set()
    for entry in entries:
        seen.add(entry.path)
        old = live.get(entry.path)
        if old is not None:
            if old.size == entry.size and old.mtime == entry.mtime:
                unchanged += 1
                continue
            old_rows[entry.path] = old
        else:
            skip = previous_skips.get(entry.path)
            # a file skipped before is not retried until it changes (or the pixel bound grows)
            if (skip is not None and skip.size == entry.size and skip.mtime == entry.mtime
                    and not (skip.max_pixels is not None and max_pixels > skip.max_pixels)):
                kept.append(skip)
                continue
        todo.append(entry)
    deleted: dict[str, list[str]] = {}
    for path, old in live.items():
        if path not in seen:
            deleted.setdefault(old.shard, []).append(old.id)
    return _Plan(todo, unchanged, old_rows, deleted, kept)


@dataclass(frozen=True)
class _Source:
    """A stored row whose vectors a file with the same bytes can take."""

    shard: str
    row: int
    size: int


@dataclass
class Reused:
    """A file whose bytes match a stored row: its vectors are copied, not encoded."""

    entry: FileEntry
    sha256: str
    source: _Source


def reuse_sources(index_dir: Path, manifest: dict[str, Any], todo: Sequence[FileEntry]) -> dict[str, _Source]:
    """sha256 → a stored row, for the rows of the committed shards whose file size equals that of
    a file in ``todo`` (bytes that match must have the same size: the filter keeps this map,
    and the files hashed ahead of decoding, to the few that can match).

    Every row counts, retired ones too: a renamed file's old row is retired by the same run
    (or was by an earlier one), yet its vectors are still in its Arrow shard until compaction.
    """
    sizes = pa.array(sorted({entry.size for entry in todo}), type=pa.int64())
    sources: dict[str, _Source] = {}
    if not len(sizes):
        return sources
    for entry in manifest["shards"]:
        table = open_arrow(index_dir / entry["arrow"])
        rows = pc.indices_nonzero(pc.is_in(table.column("size"), value_set=sizes)).to_numpy()
        if not len(rows):
            continue
        picked = table.select(["sha256", "size"]).take(pa.array(rows))
        for row, digest, size in zip(rows.tolist(), picked.column("sha256").to_pylist(),
                                     picked.column("size").to_pylist(), strict=True):
            sources.setdefault(digest, _Source(entry["name"], row, size))
    return sources


def _decode_or_reuse(entry: FileEntry, *, max_pixels: int, sources: dict[str, _Source],
                     sizes: frozenset[int]) -> Decoded | Reused | SkipRecord:
    """``Reused`` when the file's bytes are stored already, else the decode stage's answer.

    Only a file of a stored size is hashed first, so a file is read at most once more than
    before, and only when it may be a copy; a file that cannot be hashed goes on to the decode
    stage, which names what is wrong with it.
    """
    if entry.size in sizes:
        try:
            digest = file_sha256(entry.abspath)
        except (OSError, ImageError):
            digest = None
        if digest is not None and digest in sources:
            return Reused(entry, digest, sources[digest])
    return decode_file(entry, max_pixels=max_pixels)


def decode_stream(entries: Sequence[FileEntry], *, workers: int, prefetch: int, max_pixels: int,
                  sources: dict[str, _Source] | None = None,
                  sizes: frozenset[int] = frozenset()) -> Iterator[Decoded | Reused | SkipRecord]:
    """Decode ``entries`` in a thread pool, in order, at most ``prefetch`` files ahead.

    With ``sources`` (``reuse_sources``), a file whose size is in ``sizes`` and whose hash is
    a key of ``sources`` comes back as ``Reused`` without being decoded."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vkd-decode")
    pending: deque[Future] = deque()
    upcoming = iter(entries)
    options = {"max_pixels": max_pixels, "sources": sources or {}, "sizes": sizes if sources else frozenset()}
    try:
        for entry in upcoming:
            pending.append(pool.submit(_decode_or_reuse, entry, **options))
            if len(pending) >= prefetch:
                break
        while pending:
            done = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(_decode_or_reuse, following, **options))
            yield done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_compatible(index_dir: Path, manifest: dict[str, Any], root: Path, student: dict[str, Any],
                      teacher: dict[str, Any] | None) -> None:
    fix = f"pass --rebuild to re-index everything into {index_dir}, or choose another --out"
    old = manifest["student"]
    if old["fingerprint"] != student["fingerprint"]:
        raise IndexMismatchError(
            f"{index_dir}: this index holds vectors of student {old['name']} (fingerprint "
            f"{old['fingerprint']}, dim {old['dim']}), but the student given is {student['name']} "
            f"(fingerprint {student['fingerprint']}, dim {student['dim']}); vectors of different models "
            f"cannot share an index: {fix}")
    old_teacher = manifest.get("teacher")
    if old_teacher is None and teacher is not None:
        raise IndexMismatchError(
            f"{index_dir}: this index was built without a teacher, so its shards have no teacher vectors; "
            f"to store teacher vectors of {teacher['name']}, {fix}")
    if old_teacher is not None and teacher is None:
        raise IndexMismatchError(
            f"{index_dir}: this index stores teacher vectors of {old_teacher['name']} (fingerprint "
            f"{old_teacher['fingerprint']}); pass --teacher {old_teacher['name']} to add to it, or {fix}")
    if old_teacher is not None and teacher is not None and old_teacher["fingerprint"] != teacher["fingerprint"]:
        raise IndexMismatchError(
            f"{index_dir}: this index stores teacher vectors of {old_teacher['name']} (fingerprint "
            f"{old_teacher['fingerprint']}), but the teacher given is {teacher['name']} (fingerprint "
            f"{teacher['fingerprint']}): {fix}")
    if Path(manifest["images_root"]) != root:
        raise IndexMismatchError(
            f"{index_dir}: this index was built from {manifest['images_root']}, not {root}; {fix}")


def _projection_of(index_dir: Path, student: Encoder, projected: bool | None,
                   rebuild: bool) -> tuple[Any, dict[str, Any] | None]:
    """(projection, manifest ``vectors.projected_vec`` entry), or (None, None) when the index is
    not to hold projected vectors. None follows the committed index (off for a new one)."""
    from vkd.indexer.manifest import projected_record, vector_spaces
    from vkd.models.projection import ProjectionError, projection_for

    if projected is None:
        projected = False
        if not rebuild and (index_dir / MANIFEST_NAME).is_file():
            with contextlib.suppress(ManifestError):
                projected = "projected_vec" in vector_spaces(read_manifest(index_dir))
    if not projected:
        return None, None
    base = getattr(student, "base", student)  # a student named with space=teacher: its own model
    try:
        projection = projection_for(base.name, "teacher")
    except ProjectionError as error:
        raise ProjectionError(f"--projected (projected student vectors for student-index search): {error}") from None
    return projection, projected_record(projection)


def _check_projected(index_dir: Path, manifest: dict[str, Any], info: dict[str, Any] | None) -> None:
    from vkd.indexer.manifest import vector_spaces

    # an index without projected vectors, or with another projection's, gains them from its stored
    # student vectors (``_upgrade_shards``): only dropping them takes a rebuild
    old = vector_spaces(manifest).get("projected_vec")
    if old is not None and info is None:
        raise IndexMismatchError(f"{index_dir}: this index holds projected student vectors (student-index "
                                 f"search); pass --projected to add to it, or pass --rebuild to re-index "
                                 f"everything into {index_dir}")


def _teacher_ann_of(index_dir: Path, committed: dict[str, Any] | None, teacher: dict[str, Any] | None,
                    wanted: bool | None, dim: int | None, rebuild: bool) -> int | None:
    """The prefix width of the teacher ANN index the run's shards carry (None: none). ``wanted``
    None: what the committed index has, on for a new one with a teacher. An existing index
    without one gains it (``_upgrade_shards``); dropping it or changing its width takes a rebuild."""
    from vkd.indexer.manifest import vector_spaces

    if teacher is None:
        if wanted:
            raise ValueError("--teacher-ann (the teacher ANN index of student-query search) needs --teacher: the "
                             "index must store teacher vectors")
        return None
    chosen = teacher_ann_dim(teacher.get("family"), int(teacher["dim"]), dim)
    if committed is None or rebuild:
        return None if wanted is False else chosen
    old = (vector_spaces(committed).get("teacher_vec") or {}).get("ann")
    fix = f"pass --rebuild to re-index everything into {index_dir}"
    if old is None:
        return chosen if wanted else None
    if wanted is False:
        raise IndexMismatchError(f"{index_dir}: this index has a teacher ANN index (student-query search); "
                                 f"leave out --no-teacher-ann to add to it, or {fix}")
    if dim is not None and int(dim) != int(old["dim"]):
        raise IndexMismatchError(f"{index_dir}: this index's teacher ANN holds the first {old['dim']} dimensions "
                                 f"of the teacher vectors, not {dim}: leave out --teacher-ann-dim, or {fix}")
    return int(old["dim"])


def _ann_specs(rows: int, student_dim: int, teacher_prefix: int | None, share: int | None,
               index_type: str) -> tuple[IndexSpec, IndexSpec | None]:
    """A shard's FAISS indexes, chosen by the one rule (``choose_index``) for each vector width;
    the shard's budget share is split between them by width (``split_share``)."""
    widths = (student_dim,) if teacher_prefix is None else (student_dim, teacher_prefix)
    shares = split_share(share, widths)
    spec = choose_index(rows, student_dim, shares[0], index_type)
    if teacher_prefix is None:
        return spec, None
    return spec, choose_index(rows, teacher_prefix, shares[1], index_type)


def _upgrade_shards(index_dir: Path, manifest: dict[str, Any], *, projection: Any,
                    projected_info: dict[str, Any] | None, teacher_prefix: int | None, share: int | None,
                    index_type: str) -> list[str]:
    """Give the committed shards what this run asks for and they lack, from what they store,
    without running a model: ``projected_vec`` (the stored student vectors through the student's
    projection; each such shard is rewritten under a new name, its FAISS files copied, since the
    rows and student vectors are unchanged) and the teacher ANN (``shard-N.teacher.faiss`` over
    the stored teacher vectors). Updates ``manifest`` in memory only when every file is written;
    the caller commits it (one atomic swap) and removes the files it no longer lists. Returns
    the shards upgraded."""
    import copy
    import shutil

    from vkd.indexer.manifest import vector_spaces

    vectors = copy.deepcopy(vector_spaces(manifest))
    old_projected = vectors.get("projected_vec")
    reproject = projected_info is not None and (
        old_projected is None or old_projected.get("projection_sha256") != projected_info["projection_sha256"])
    add_ann = teacher_prefix is not None and not (vectors.get("teacher_vec") or {}).get("ann")
    if not (reproject or add_ann):
        return []
    # with no committed shard the loop is empty and only the record changes: the shards this run
    # writes carry the new vectors, and its commits publish the record with them
    next_number = int(manifest["next_shard"])
    shards, upgraded = [], []
    for entry in manifest["shards"]:
        table = open_arrow(index_dir / entry["arrow"])
        new_entry = dict(entry)
        if reproject:
            projected = projection.apply(vector_view(table, STUDENT_COLUMN))
            if PROJECTED_COLUMN in table.column_names:
                table = table.drop_columns([PROJECTED_COLUMN])
            field = pa.field(PROJECTED_COLUMN, pa.list_(pa.float16(), projected.shape[1]), nullable=False)
            table = table.append_column(field, vector_array(projected, np.float16, projected.shape[1]))
            # a new name: readers of the committed manifest keep mapping the old file
            name = shard_name(next_number)
            next_number += 1
            data = arrow_bytes(table.combine_chunks().to_batches()[0])
            atomic_write(index_dir / f"{name}.arrow", lambda handle, data=data: handle.write(memoryview(data)))
            new_entry.update(name=name, arrow=f"{name}.arrow", arrow_bytes=data.size,
                             arrow_sha256=hashlib.sha256(memoryview(data)).hexdigest(), created=now_iso())
            for ann in ANN_FILES:  # same rows, same student (and teacher) vectors: the same FAISS bytes
                if ann.file_key in entry:
                    with open(index_dir / entry[ann.file_key], "rb") as source:
                        atomic_write(index_dir / ann.file_name(name),
                                     lambda handle, source=source: shutil.copyfileobj(source, handle))
                    new_entry[ann.file_key] = ann.file_name(name)
            table = open_arrow(index_dir / f"{name}.arrow")
        if add_ann:
            _, spec = _ann_specs(table.num_rows, table.schema.field(STUDENT_COLUMN).type.list_size, teacher_prefix,
                                 share, index_type)
            write_ann(index_dir, new_entry, table, TEACHER_ANN, spec, teacher_prefix)
        shards.append(new_entry)
        upgraded.append(new_entry["name"])
    if reproject:
        vectors["projected_vec"] = projected_info
    if add_ann:
        vectors["teacher_vec"]["ann"] = {"dim": int(teacher_prefix)}
    manifest.update(shards=shards, next_shard=next_number, vectors=vectors)
    return upgraded


def _check_out_dir(index_dir: Path) -> None:
    """Refuse to turn a folder with other content into an index (--rebuild deletes shard files)."""
    if not index_dir.is_dir():
        return
    foreign = [p.name for p in index_dir.iterdir()
               if not (SHARD_FILE.match(p.name) or p.name in INDEX_OWN_NAMES or TMP_MARKER in p.name)]
    if foreign:
        raise ValueError(f"{index_dir} exists and holds files that are not a vkd index ({', '.join(sorted(foreign)[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out")


class _ShardBuffer:
    """Rows of the shard being filled: metadata lists and vector blocks."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {k: [] for k in ("id", "path", "size", "mtime", "sha256",
                                                                "width", "height", CAPTURED_COLUMN)}
        self.student: list[np.ndarray] = []
        self.teacher: list[np.ndarray] = []

    def _row(self, entry: FileEntry, sha256: str, width: int, height: int, captured: int | None) -> None:
        for key, value in (("id", entry.id), ("path", entry.path), ("size", entry.size),
                           ("mtime", entry.mtime), ("sha256", sha256), ("width", width),
                           ("height", height), (CAPTURED_COLUMN, captured)):
            self.columns[key].append(value)

    def add(self, decoded: Sequence[Decoded], student: np.ndarray, teacher: np.ndarray | None) -> None:
        for item in decoded:
            self._row(item.entry, item.sha256, item.width, item.height, item.captured)
        self.student.append(student)
        if teacher is not None:
            self.teacher.append(teacher)

    def add_copy(self, item: Reused, table: pa.Table, captured: int | None) -> None:
        """One row whose vectors (and picture facts) are copied from ``table``'s row ``item.source.row``."""
        row = item.source.row
        self._row(item.entry, item.sha256, table.column("width")[row].as_py(),
                  table.column("height")[row].as_py(), captured)
        # copies: the new shard must not keep a view into a file a compaction may delete
        self.student.append(np.array(vector_view(table, STUDENT_COLUMN)[row:row + 1], dtype=np.float32))
        if TEACHER_COLUMN in table.column_names:
            self.teacher.append(np.array(vector_view(table, TEACHER_COLUMN)[row:row + 1], dtype=np.float16))

    def __len__(self) -> int:
        return len(self.columns["id"])


def _share(budget: int, shard_size: int, total_rows: int) -> int:
    """Each shard's part of the whole index's memory budget: a full shard's share of the rows.

    Every shard gets the same share, so a small last shard (or one thinned by skipped files)
    still covers the fixed costs (codebooks, centroids) of its index.
    """
    return max(1, budget * min(shard_size, total_rows) // max(total_rows, 1))


def _limit_faiss_threads(threads: int) -> None:
    # OpenMP's thread count is per calling thread: this caps FAISS builds in the writer thread
    # only, leaving the cores the encoder uses in the main thread. Two OpenMP pools (torch's
    # and faiss's) spinning on the same cores slow each other down by orders of magnitude.
    import faiss

    faiss.omp_set_num_threads(max(1, threads))


def _recorded_options(index_dir: Path, role: str, model: Any, given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The options the index at ``index_dir`` recorded for ``model`` when it names the recorded
    model, under the ones ``given`` (those win); else ``given``."""
    if not isinstance(model, (str, os.PathLike)) or not (index_dir / MANIFEST_NAME).is_file():
        return given
    try:
        recorded = read_manifest(index_dir).get(role) or {}
    except ManifestError:
        return given  # the run itself reports it
    name = Path(model).expanduser()
    if recorded.get("name") != (str(name.resolve()) if name.exists() else str(model)):
        return given
    return {**(recorded.get("options") or {}), **{k: v for k, v in (given or {}).items() if v is not None}}


@dataclass
class RunStart:
    plan: _Plan
    skips: list[SkipRecord]  # kept from earlier runs + found by this scan; encoding adds more
    scan_skips: list[SkipRecord]
    previous_skips: list[SkipRecord]  # skipped.jsonl as committed (empty on a rebuild)
    share: int | None  # memory budget share of each shard's ANN indexes


def prepare_run(index_dir: Path, root: Path, manifest: dict[str, Any], result: BuildResult, *, rebuild: bool,
                follow_links: bool, max_pixels: int, budget: int | None, shard_size: int, student_dim: int,
                teacher_prefix: int | None, index_type: str) -> RunStart:
    """List the folder, plan the run (``plan_run``), check the memory budget and fill
    ``result``'s counts. Every engine starts here, so the local and the Ray indexer plan and
    check budgets identically."""
    entries, scan_skips = scan_images(root, exclude=[index_dir], follow_links=follow_links)
    previous_skips = [] if rebuild else read_skipped(index_dir)
    plan = plan_run(index_dir, manifest, entries, max_pixels, previous_skips)
    result.scanned, result.unchanged, result.to_encode = len(entries), plan.unchanged, len(plan.todo)
    expected_rows = plan.unchanged + len(plan.todo)
    skips: list[SkipRecord] = plan.kept_skips + scan_skips
    share = None if budget is None else _share(budget, shard_size, expected_rows)
    if share is not None and plan.todo:  # fail now, not after encoding a whole shard
        first = min(shard_size, len(plan.todo))
        try:
            _ann_specs(first, student_dim, teacher_prefix, share, index_type)
        except BudgetTooSmallError as error:
            total = -(-error.needed * expected_rows // min(shard_size, expected_rows))
            raise BudgetTooSmallError(
                f"--memory-budget {budget} bytes over {expected_rows} rows leaves {share} bytes for a "
                f"shard of {first} rows; {error}: use --memory-budget {total} or more", total) from None
    return RunStart(plan, skips, scan_skips, previous_skips, share)


def build_index(
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    student: str | Encoder,
    teacher: str | Encoder | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    shard_size: int = 50_000,
    index_type: str = "auto",
    memory_budget: int | str | None = None,
    rebuild: bool = False,
    show_progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: Any = None,
    prefetch: int | None = None,
    faiss_threads: int | None = None,
    follow_links: bool = False,
    student_options: dict[str, Any] | None = None,
    teacher_options: dict[str, Any] | None = None,
    prefer: str | None = None,
    projected: bool | None = None,
    teacher_ann: bool | None = None,
    teacher_ann_dim: int | None = None,
) -> BuildResult:
    """Index the images under ``images_dir`` into ``out_dir`` (default: ``<images_dir>.vkd``).

    Incremental: files already indexed with the same size and mtime are kept, changed and
    deleted files' old rows are retired. ``rebuild`` starts from an empty index.
    ``memory_budget`` (bytes or "4GB") caps the RAM of all FAISS indexes together.
    ``workers`` decode threads (default min(8, CPUs)) keep ``prefetch`` images ahead of the
    encoder; ``faiss_threads`` (default half the CPUs) build each shard's FAISS index while
    the next shard is encoded.
    ``follow_links`` also indexes files reached through symlinks whose target lies outside
    ``images_dir``; without it they are listed as skipped (links inside are always followed).
    ``student_options``/``teacher_options``: ``load_encoder`` options for a model given by name
    (e.g. ``{"query_instruction": ..., "document_instruction": ...}``); the manifest records
    each model's options either way, search reopens the models with them, and a later run of
    the same model takes the recorded ones for those it is not given.
    ``prefer`` ("onnx", "torch", or None) picks the backend of each model given by name:
    None takes the model's ONNX export (``<model>/onnx``, with an image tower) on a CPU and
    torch on CUDA; the run's ``student_backend``/``teacher_backend`` say what ran.
    ``projected`` also stores each row's student vector through the student's projection into
    its teacher's space (``projected_vec``: the student-index search mode, no teacher needed at
    index time); None keeps what the index has (off for a new one). On an existing index it
    is computed from the stored student vectors (no model runs; the shards are rewritten and
    committed in one manifest swap before the run's own work).
    ``teacher_ann`` also builds, per shard, a FAISS index over the stored teacher vectors (their
    first ``teacher_ann_dim`` dimensions: by default a Matryoshka prefix for a teacher trained
    with one, else all), for ANN student-query search; None keeps what the index has (on for a
    new one with a teacher). An existing index gains it from its stored teacher vectors.
    Raises ``IndexMismatchError`` when ``out_dir`` holds an index of other models or folder.
    """
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{images_dir}: not a directory of images")
    index_dir = default_out_dir(root) if out_dir is None else Path(out_dir).expanduser().resolve()
    if index_dir == root:
        raise ValueError(f"--out {index_dir} is the images folder itself; choose another directory")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("max_pixels", max_pixels)):
        if int(value) < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type={index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    workers = max(1, int(workers) if workers else min(8, os.cpu_count() or 1))
    prefetch = prefetch or max(2 * batch_size, 4 * workers)
    faiss_threads = faiss_threads or max(1, (os.cpu_count() or 1) // 2)
    budget = parse_bytes(memory_budget)
    if budget is not None and budget <= 0:
        raise ValueError(f"memory_budget={memory_budget!r}: must be positive")

    if not rebuild:  # an incremental run of the same model encodes as the index was built
        student_options = _recorded_options(index_dir, "student", student, student_options)
        teacher_options = _recorded_options(index_dir, "teacher", teacher, teacher_options)
    stage = EncodeStage(student, teacher, batch_size=batch_size, device=device, student_options=student_options,
                        teacher_options=teacher_options, prefer=prefer)
    started = time.perf_counter()  # after loading the models: the run's own cost
    student_info = model_record(stage.student.describe())
    projection, projected_info = _projection_of(index_dir, stage.student, projected, rebuild)
    teacher_info = model_record(stage.teacher.describe()) if stage.teacher is not None else None
    build_params = {"index_type": index_type, "memory_budget": budget, "shard_size": shard_size,
                    "max_pixels": max_pixels, "follow_links": bool(follow_links)}

    index_dir.mkdir(parents=True, exist_ok=True)
    result = BuildResult(index_dir, student_backend=backend_label(stage.student),
                         teacher_backend=backend_label(stage.teacher) if stage.teacher is not None else None)
    with writer_lock(index_dir):
        committed = None  # the manifest readers see: its files are never touched by this run
        if (index_dir / MANIFEST_NAME).exists():
            try:
                committed = read_manifest(index_dir)
            except ManifestError as error:
                if not rebuild:
                    raise ManifestError(f"{error}; pass --rebuild to start this index over") from None
        else:
            _check_out_dir(index_dir)
        result.removed_leftovers = remove_unlisted(index_dir, committed)
        if committed is not None and not rebuild:
            _check_compatible(index_dir, committed, root, student_info, teacher_info)
            _check_projected(index_dir, committed, projected_info)
        teacher_prefix = _teacher_ann_of(index_dir, committed, teacher_info, teacher_ann, teacher_ann_dim, rebuild)
        if committed is not None and not rebuild:
            manifest = committed
            repaired = repair_shards(index_dir, manifest)
            result.repaired = repaired.rebuilt_faiss + repaired.dropped_shards
            if repaired:
                commit_manifest(index_dir, manifest)
            old_build = committed.get("build") or {}
            old_budget = old_build.get("memory_budget")
            old_share = None if old_budget is None else _share(
                int(old_budget), int(old_build.get("shard_size") or shard_size), max(int(committed.get("rows", 0)), 1))
            result.upgraded = _upgrade_shards(index_dir, manifest, projection=projection,
                                              projected_info=projected_info, teacher_prefix=teacher_prefix,
                                              share=old_share, index_type=old_build.get("index_type") or index_type)
            if result.upgraded:  # one swap: readers see every shard upgraded, or none
                commit_manifest(index_dir, manifest)
                remove_unlisted(index_dir, manifest)
        else:
            # a rebuild writes shards under new names and publishes them in one commit at the end:
            # until then readers, and a run that resumes after a kill, see the old index whole
            manifest = new_manifest(root, student_info, teacher_info, build_params)
            if projected_info is not None:
                manifest["vectors"]["projected_vec"] = projected_info
            if teacher_prefix is not None:
                manifest["vectors"]["teacher_vec"]["ann"] = {"dim": int(teacher_prefix)}
            if committed is not None:
                manifest["next_shard"] = int(committed.get("next_shard", 0))
        manifest["build"] = build_params
        publish_each_shard = not (rebuild and committed is not None)

        run_start = prepare_run(index_dir, root, manifest, result, rebuild=rebuild, follow_links=follow_links,
                                max_pixels=max_pixels, budget=budget, shard_size=shard_size,
                                student_dim=int(student_info["dim"]), teacher_prefix=teacher_prefix,
                                index_type=index_type)
        plan, skips, share = run_start.plan, run_start.skips, run_start.share
        pending_retire: dict[str, list[str]] = {k: list(v) for k, v in plan.deleted.items()}
        sources = reuse_sources(index_dir, manifest, plan.todo) if plan.todo else {}
        source_tables: dict[str, pa.Table] = {}  # memory-mapped, opened on the first copy from each shard

        def copy_into(buffer: _ShardBuffer, item: Reused) -> None:
            name = item.source.shard
            if name not in source_tables:
                source_tables[name] = open_arrow(index_dir / f"{name}.arrow")
            table = source_tables[name]
            if CAPTURED_COLUMN in table.column_names:
                captured = captured_values(table)[item.source.row].as_py()
            else:  # a shard from before the column: read the date (a decode, still no encode)
                try:
                    captured = read_image_file(item.entry.abspath, max_pixels=max_pixels, captured=True).captured
                except (OSError, ImageError):
                    captured = None
            buffer.add_copy(item, table, captured)
            result.reused += 1
        unfinished = None
        if plan.todo or committed is None:
            # recorded before any work, dropped by the final commit: a killed run leaves it behind
            unfinished = {"started": now_iso(), "pid": os.getpid(), "to_encode": len(plan.todo),
                          "rebuild": bool(rebuild)}
            marked = committed if not publish_each_shard else manifest
            marked["unfinished_run"] = unfinished
            if committed is None:
                write_skipped(index_dir, [])
            commit_manifest(index_dir, marked)

        def commit(buffer: _ShardBuffer | None, retire: dict[str, list[str]], skip_list: list[SkipRecord],
                   publish: bool = publish_each_shard) -> None:
            # runs in the writer thread; the main thread touches `manifest` only after joining it
            if buffer is not None and len(buffer):
                student_vecs = np.concatenate(buffer.student)
                teacher_vecs = np.concatenate(buffer.teacher) if buffer.teacher else None
                metadata = {"vkd.student_fingerprint": student_info["fingerprint"],
                            "vkd.teacher_fingerprint": teacher_info["fingerprint"] if teacher_info else ""}
                # derived from the student vectors (copied rows included): no model runs for it
                projected_vecs = projection.apply(student_vecs) if projection is not None else None
                batch = make_record_batch(buffer.columns, student_vecs, teacher_vecs, metadata, projected_vecs)
                spec, teacher_spec = _ann_specs(len(buffer), student_vecs.shape[1], teacher_prefix, share, index_type)
                entry = write_shard(index_dir, shard_name(int(manifest["next_shard"])), batch, spec,
                                    teacher_spec=teacher_spec, teacher_ann_dim=teacher_prefix)
                manifest["shards"].append(entry)
                manifest["next_shard"] = int(manifest["next_shard"]) + 1
                result.shards_written += 1
                result.added += len(buffer)
            for shard in manifest["shards"]:
                if shard["name"] in retire:
                    shard["retired"] = sorted(set(shard["retired"]) | set(retire[shard["name"]]))
                    result.retired += len(retire[shard["name"]])
            if publish:
                manifest["skipped"] = write_skipped(index_dir, skip_list)
                commit_manifest(index_dir, manifest)

        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(plan.todo), desc="index", unit="img", dynamic_ncols=True)

        def encode_into(buffer: _ShardBuffer, batch: list[Decoded]) -> None:
            tick = time.perf_counter()
            encoded = stage.encode([item.image for item in batch])
            result.encode_seconds += time.perf_counter() - tick
            buffer.add([batch[i] for i in encoded.ok], encoded.student, encoded.teacher)
            for position, reason in encoded.failed.items():
                entry = batch[position].entry
                skips.append(SkipRecord(entry.path, reason, entry.size, entry.mtime))

        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vkd-write",
                                    initializer=_limit_faiss_threads, initargs=(faiss_threads,))
        stream = decode_stream(plan.todo, workers=workers, prefetch=prefetch, max_pixels=max_pixels,
                               sources=sources, sizes=frozenset(source.size for source in sources.values()))
        in_flight: Future | None = None
        finished = False
        try:
            with pixel_guard(max_pixels):
                for start in range(0, len(plan.todo), shard_size):
                    chunk = plan.todo[start:start + shard_size]
                    buffer = _ShardBuffer()
                    batch: list[Decoded] = []
                    for _ in chunk:
                        tick = time.perf_counter()
                        item = next(stream)
                        result.starved_seconds += time.perf_counter() - tick
                        if isinstance(item, SkipRecord):
                            skips.append(item)
                            result.new_skips += 1
                        elif isinstance(item, Reused):
                            copy_into(buffer, item)
                        else:
                            batch.append(item)
                            if len(batch) == batch_size:
                                encode_into(buffer, batch)
                                batch = []
                        if progress is not None:
                            progress.update(1)
                            progress.set_postfix(skipped=result.new_skips, refresh=False)
                    if batch:
                        encode_into(buffer, batch)
                    for entry in chunk:
                        old = plan.old_rows.get(entry.path)
                        if old is not None:
                            pending_retire.setdefault(old.shard, []).append(old.id)
                    if in_flight is not None:
                        in_flight.result()
                    in_flight = writer.submit(commit, buffer, pending_retire, list(skips))
                    pending_retire = {}
            if in_flight is not None:
                in_flight.result()
            skips_changed = sorted(r.path for r in skips) != sorted(r.path for r in run_start.previous_skips)
            left_by_earlier_run = committed is not None and "unfinished_run" in committed
            if unfinished is not None or left_by_earlier_run or pending_retire or skips_changed:
                manifest.pop("unfinished_run", None)
                commit(None, pending_retire, skips, publish=True)
            finished = True
        finally:
            stream.close()
            writer.shutdown(wait=True)
            if progress is not None:
                progress.close()
            if not finished:  # failed (disk full, model error, budget...): leave no unlisted file behind
                _remove_uncommitted(index_dir)
        if not publish_each_shard:
            remove_unlisted(index_dir, manifest)  # the old shards: open snapshots keep their handles
        result.new_skips = len(skips) - len(plan.kept_skips) - len(run_start.scan_skips)
        result.skipped = len(skips)
    result.seconds = time.perf_counter() - started
    return result


def _remove_uncommitted(index_dir: Path) -> None:
    with contextlib.suppress(OSError, ManifestError):
        committed = read_manifest(index_dir) if (index_dir / MANIFEST_NAME).exists() else None
        remove_unlisted(index_dir, committed)


@dataclass
class CompactResult:
    index_dir: Path
    shards_before: int
    shards_after: int
    rows_dropped: int
    rewritten: list[str]
    removed_files: list[str]


def compact_index(index_dir: str | os.PathLike[str], *, reindex: bool = False, index_type: str | None = None,
                  memory_budget: int | str | None = None) -> CompactResult:
    """Rewrite every shard that has retired rows without them, in one atomic commit.

    ``reindex`` rewrites all shards (FAISS rebuilt from the Arrow vectors), with
    ``index_type``/``memory_budget`` if given, else the ones the index was built with.
    Readers that opened the index before keep their snapshot (their mapped files stay valid).
    """
    path = Path(index_dir).expanduser().resolve()
    with writer_lock(path):
        manifest = read_manifest(path)
        remove_unlisted(path, manifest)
        build = manifest.get("build") or {}
        kind = index_type or build.get("index_type") or "auto"
        if kind not in INDEX_TYPES:
            raise ValueError(f"index_type={kind!r}: choose one of {', '.join(INDEX_TYPES)}")
        budget = parse_bytes(memory_budget) if memory_budget is not None else build.get("memory_budget")
        live_total = sum(int(s["rows"]) - len(s["retired"]) for s in manifest["shards"])
        ann = (vector_spaces(manifest).get("teacher_vec") or {}).get("ann")
        teacher_prefix = int(ann["dim"]) if ann else None  # a rewritten shard keeps its teacher ANN
        kept, rewritten, dropped = [], [], 0
        for entry in manifest["shards"]:
            if not entry["retired"] and not reindex:
                kept.append(entry)
                continue
            table = open_arrow(path / entry["arrow"])
            if entry["retired"]:
                retired = pc.is_in(table.column("id"), value_set=pa.array(entry["retired"], type=pa.string()))
                table = table.filter(pc.invert(retired))
            dropped += int(entry["rows"]) - table.num_rows
            rewritten.append(entry["name"])
            if table.num_rows == 0:
                continue
            batch = table.combine_chunks().to_batches()[0]
            size = int(build.get("shard_size") or table.num_rows)
            share = None if budget is None else _share(int(budget), max(size, table.num_rows), live_total)
            spec, teacher_spec = _ann_specs(table.num_rows, table.schema.field(STUDENT_COLUMN).type.list_size,
                                            teacher_prefix, share, kind)
            name = shard_name(int(manifest["next_shard"]))
            manifest["next_shard"] = int(manifest["next_shard"]) + 1
            kept.append(write_shard(path, name, batch, spec, teacher_spec=teacher_spec,
                                    teacher_ann_dim=teacher_prefix))
        before = len(manifest["shards"])
        manifest["shards"] = kept
        if index_type is not None or memory_budget is not None:
            manifest["build"] = {**build, "index_type": kind, "memory_budget": budget}
        commit_manifest(path, manifest)
        removed = remove_unlisted(path, manifest)
    return CompactResult(path, before, len(kept), dropped, rewritten, removed)
