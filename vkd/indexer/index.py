"""Reading an index: ``Index`` (a consistent snapshot of a committed manifest) and ``Shard``.

``Index.open`` reads ``manifest.json`` once, memory-maps the Arrow shards it lists and opens
their FAISS files; later commits by a running indexer do not change what an open ``Index``
sees: it holds every file it will read from the moment it opens, and an open file stays
readable after a compaction or rebuild deletes its name. FAISS indexes are read from those
open files on the first search.

A FAISS file that is missing, of the wrong size or unreadable does not stop the index from
opening (``info`` and ``verify`` work): searching it raises ``ShardDamagedError`` naming the
shard, until ``vkd index`` or ``vkd index verify --repair`` rebuilds it from the Arrow shard.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vkd.indexer.faiss_index import FaissSearcher, IndexSpec, deserialize_faiss
from vkd.indexer.manifest import (
    MANIFEST_NAME,
    SKIPPED_NAME,
    ManifestError,
    read_manifest,
    search_modes,
    vector_spaces,
)
from vkd.indexer.shards import (
    CAPTURED_COLUMN,
    META_COLUMNS,
    PATH_BYTES_COLUMN,
    PROJECTED_COLUMN,
    STUDENT_ANN,
    STUDENT_COLUMN,
    TEACHER_ANN,
    TEACHER_COLUMN,
    AnnFile,
    ann_rows,
    open_arrow,
    relative_paths,
    vector_view,
)

if TYPE_CHECKING:
    from vkd.indexer.build import BuildResult, CompactResult
    from vkd.models.base import Encoder


class ShardDamagedError(ManifestError):
    """A shard's FAISS file is missing or damaged; its Arrow vectors can rebuild it."""


class ShardAnn:
    """One FAISS index of a shard (``shards.AnnFile``: the student's, or the teacher ANN over a
    prefix of the teacher vectors), its file held open from the snapshot's opening; read on the
    first search. The same ``spec`` / ``rows`` / ``searcher`` as ``Shard`` offers, so the
    filtered search (``search_allowed``) runs over either."""

    def __init__(self, shard: Shard, ann: AnnFile, entry: dict[str, Any], view: np.ndarray,
                 prefix: int | None) -> None:
        self.shard_name = shard.name
        self.arrow_path = shard.arrow_path
        self.path = shard.arrow_path.parent / entry[ann.file_key]
        self.spec = IndexSpec.from_dict(entry[ann.spec_key])
        self.rows = shard.rows
        self.retired_rows = shard.retired_rows
        self.column = ann.column
        self.prefix = prefix
        self._view = view
        self.dim: int = view.shape[1] if prefix is None else int(prefix)
        self._searcher: FaissSearcher | None = None
        self._lock = threading.Lock()
        self._file, self.damage = _open_faiss(self.path, entry.get(ann.bytes_key))

    @property
    def searcher(self) -> FaissSearcher:
        if self._searcher is None:
            with self._lock:
                if self._searcher is None:
                    # IVF-PQ re-scores its finds on these vectors: the ones the index holds (the prefix)
                    source = self._view if self.prefix is None else _PrefixRows(self._view, self.prefix)
                    self._searcher = FaissSearcher(self._read(), self.spec, source, self.retired_rows)
        return self._searcher

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim]: the rows as this index holds them (a prefix normalised again)."""
        return ann_rows(self._view, np.asarray(rows, dtype=np.int64), self.prefix)

    def _damaged(self, why: str) -> ShardDamagedError:
        return ShardDamagedError(
            f"{self.path}: {why}; shard {self.shard_name} cannot be searched until its FAISS index is rebuilt "
            f"from {self.arrow_path.name}: run `vkd index verify --repair {self.path.parent}` (or re-run "
            "`vkd index` on the images folder)")

    def _read(self) -> Any:
        if self.damage is not None or self._file is None:
            raise self._damaged(self.damage or "not open")
        # pread from the handle opened with the snapshot: the name may be gone or replaced by now
        size = os.fstat(self._file.fileno()).st_size
        data = os.pread(self._file.fileno(), size, 0)
        try:
            index = deserialize_faiss(data)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise self._damaged(f"not a readable FAISS index ({first_line})") from None
        if index.ntotal != self.rows or index.d != self.dim:
            raise self._damaged(f"ntotal={index.ntotal}, d={index.d} but the Arrow shard has {self.rows} rows "
                                f"of dim {self.dim}")
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` live rows by inner product: (scores [q, k], rows [q, k]), padded -inf / -1."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"{self.shard_name}: queries have shape {queries.shape}; expected [q, {self.dim}] "
                             f"(vectors of this index's {self.column}"
                             + (f", first {self.prefix} dimensions)" if self.prefix is not None else ")"))
        return self.searcher.search(np.ascontiguousarray(queries), int(k))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _PrefixRows:
    """Row access to a vector view as its prefix, normalised again (what a prefix index holds)."""

    def __init__(self, view: np.ndarray, prefix: int) -> None:
        self.view, self.prefix = view, prefix

    def __getitem__(self, rows: Any) -> np.ndarray:
        return ann_rows(self.view, rows, self.prefix)


class Shard:
    """One Arrow shard (memory-mapped) and its FAISS indexes (their files held open): the
    student's (``search``) and, where the index has one, the teacher ANN (``teacher_ann``)."""

    def __init__(self, index_dir: Path, entry: dict[str, Any], images_root: Path,
                 teacher_ann_dim: int | None = None) -> None:
        self.entry = entry
        self.name: str = entry["name"]
        self.arrow_path = index_dir / entry["arrow"]
        self.faiss_path = index_dir / entry["faiss"]
        self.images_root = images_root
        self.spec = IndexSpec.from_dict(entry["index"])
        self.table: pa.Table = open_arrow(self.arrow_path)
        if self.table.num_rows != int(entry["rows"]):
            raise ManifestError(f"{self.arrow_path}: {self.table.num_rows} rows, the manifest says "
                                f"{entry['rows']}; run `vkd index verify {index_dir}`")
        self.rows: int = self.table.num_rows
        retired = entry.get("retired") or []
        if retired:
            mask = pc.is_in(self.table.column("id"), value_set=pa.array(retired, type=pa.string()))
            self.retired_rows = np.asarray(pc.indices_nonzero(mask).to_numpy(), dtype=np.int64)
        else:
            self.retired_rows = np.zeros(0, dtype=np.int64)
        self.live_rows: int = self.rows - len(self.retired_rows)
        self.dim: int = self.table.schema.field(STUDENT_COLUMN).type.list_size
        self.teacher_dim: int | None = (self.table.schema.field(TEACHER_COLUMN).type.list_size
                                        if TEACHER_COLUMN in self.table.column_names else None)
        self._student = vector_view(self.table, STUDENT_COLUMN)
        self._teacher = vector_view(self.table, TEACHER_COLUMN) if self.teacher_dim else None
        self.projected_dim: int | None = (self.table.schema.field(PROJECTED_COLUMN).type.list_size
                                          if PROJECTED_COLUMN in self.table.column_names else None)
        self._projected = vector_view(self.table, PROJECTED_COLUMN) if self.projected_dim else None
        self.student_ann = ShardAnn(self, STUDENT_ANN, entry, self._student, None)
        #: the FAISS index over the teacher vectors' first ``teacher_ann_dim`` dimensions (student-query)
        self.teacher_ann: ShardAnn | None = None
        if TEACHER_ANN.file_key in entry and self._teacher is not None:
            prefix = teacher_ann_dim if teacher_ann_dim is not None and teacher_ann_dim < self._teacher.shape[1] else None
            self.teacher_ann = ShardAnn(self, TEACHER_ANN, entry, self._teacher, prefix)

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, rows={self.rows}, live={self.live_rows}, index={self.spec.factory})"

    def __len__(self) -> int:
        return self.live_rows

    @property
    def damage(self) -> str | None:
        """What is wrong with the student FAISS file (None: nothing found at opening)."""
        return self.student_ann.damage

    @property
    def teacher_damage(self) -> str | None:
        return self.teacher_ann.damage if self.teacher_ann is not None else None

    @property
    def searcher(self) -> FaissSearcher:
        return self.student_ann.searcher

    def ann(self, column: str) -> ShardAnn:
        """The shard's FAISS index over ``column`` (student_vec, or teacher_vec for the teacher ANN)."""
        found = {STUDENT_COLUMN: self.student_ann, TEACHER_COLUMN: self.teacher_ann}.get(column)
        if found is None:
            raise ValueError(f"{self.name}: no FAISS index over {column}")
        return found

    def close(self) -> None:
        """Release the FAISS files (the Arrow map goes with the last reference to the table)."""
        self.student_ann.close()
        if self.teacher_ann is not None:
            self.teacher_ann.close()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` live rows by inner product for each query.

        ``queries`` float32 [q, d] (normalised). Returns (scores [q, k] float32, rows [q, k]
        int64 into ``table``), padded with -inf / -1 when the shard has fewer live rows.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"{self.name}: queries have shape {queries.shape}; expected [q, {self.dim}] "
                             "(vectors of this index's student)")
        return self.student_ann.search(queries, k)

    def _rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            bad = rows[(rows < 0) | (rows >= self.rows)][0]
            raise IndexError(f"{self.name}: row {bad} out of range [0, {self.rows})")
        return rows

    def student_vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 [len(rows), d]: only the requested rows are read from the memory map."""
        return np.ascontiguousarray(self._student[self._rows(rows)], dtype=np.float32)

    def teacher_vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 [len(rows), d_t] from the stored float16 teacher vectors."""
        if self._teacher is None:
            raise ValueError(f"{self.name}: no {TEACHER_COLUMN} column: the index was built without "
                             "--teacher (re-index with --teacher MODEL --rebuild to store teacher vectors)")
        return self._teacher[self._rows(rows)].astype(np.float32)

    def vector_block(self, column: str) -> np.ndarray:
        """The zero-copy [rows, d] view of vector column ``column`` (float16 for teacher_vec and
        projected_vec): what the asymmetric modes scan in chunks."""
        views = {STUDENT_COLUMN: self._student, TEACHER_COLUMN: self._teacher, PROJECTED_COLUMN: self._projected}
        view = views.get(column)
        if view is None:
            raise ValueError(f"{self.name}: no {column} column")
        return view

    def projected_vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 [len(rows), d_t] from the stored float16 projected student vectors."""
        if self._projected is None:
            raise ValueError(f"{self.name}: no {PROJECTED_COLUMN} column: the index was built without "
                             "--projected (re-index with --projected --rebuild)")
        return self._projected[self._rows(rows)].astype(np.float32)

    def records(self, rows: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """Row metadata: id, path (absolute), relpath, size, mtime (ns), sha256, width, height,
        captured (EXIF capture time in ns since the epoch, or None; None for every row of a shard
        written before the column existed).

        ``path`` and ``relpath`` are the exact names (os.fsdecode form: ``open(path)`` works even
        for a name that is not UTF-8), not the readable text of the Arrow ``path`` column.
        """
        rows = self._rows(rows)
        columns = [c for c in (*META_COLUMNS, PATH_BYTES_COLUMN, CAPTURED_COLUMN) if c in self.table.column_names]
        picked = self.table.select(columns).take(pa.array(rows, type=pa.int64()))
        taken = picked.to_pylist()
        for row, record, relpath in zip(rows.tolist(), taken, relative_paths(picked), strict=True):
            record.pop(PATH_BYTES_COLUMN, None)
            record.setdefault(CAPTURED_COLUMN, None)
            record["relpath"] = relpath
            record["path"] = str(self.images_root.joinpath(*relpath.split("/")))
            record["shard"] = self.name
            record["row"] = row
        return taken

    def live_mask(self) -> np.ndarray:
        mask = np.ones(self.rows, dtype=bool)
        mask[self.retired_rows] = False
        return mask


def _open_faiss(path: Path, expected_bytes: Any) -> tuple[Any, str | None]:
    """(open binary handle or None, what is wrong with the file or None)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - held for the snapshot's lifetime, closed by Shard.close
    except FileNotFoundError:
        return None, "missing"
    except OSError as error:
        return None, f"cannot open: {error.strerror or error}"
    size = os.fstat(handle.fileno()).st_size
    if expected_bytes is not None and size != int(expected_bytes):
        return handle, f"{size} bytes, the manifest says {expected_bytes} (truncated or replaced)"
    return handle, None


class Index:
    """A vkd index directory: manifest + shards. Open with ``Index.open``, make with ``Index.build``."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard], images_root: Path) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.images_root = images_root
        self.student: dict[str, Any] = manifest["student"]
        self.teacher: dict[str, Any] | None = manifest.get("teacher")
        #: which vector columns the shards hold, and in which space (manifest ``vectors``)
        self.vectors: dict[str, dict[str, Any]] = vector_spaces(manifest)
        self.last_build: BuildResult | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, images_root: str | os.PathLike[str] | None = None) -> Index:
        """Open the last committed state of the index at ``path``.

        ``images_root`` overrides the manifest's, for an index whose images folder moved.
        """
        index_dir = Path(path).expanduser().resolve()
        for attempt in range(3):
            manifest = read_manifest(index_dir)
            root = Path(images_root).expanduser().resolve() if images_root else Path(manifest["images_root"])
            shards: list[Shard] = []
            ann = (vector_spaces(manifest).get("teacher_vec") or {}).get("ann")
            try:
                for entry in manifest["shards"]:
                    shards.append(Shard(index_dir, entry, root, int(ann["dim"]) if ann else None))
            except (FileNotFoundError, OSError, pa.ArrowInvalid) as error:
                for shard in shards:
                    shard.close()
                # a compaction may have committed and removed these files since we read the manifest
                if attempt < 2 and read_manifest(index_dir) != manifest:
                    continue
                arrow = index_dir / entry["arrow"]
                why = "does not exist" if not arrow.exists() else f"cannot be read ({error})"
                raise ManifestError(f"{index_dir / MANIFEST_NAME}: lists {arrow}, which {why}; run "
                                    f"`vkd index verify --repair {index_dir}` (it drops the shard, and the next "
                                    "`vkd index` run re-encodes its images)") from None
            if any(shard.damage or shard.teacher_damage for shard in shards) and attempt < 2 and read_manifest(index_dir) != manifest:
                # a commit (compaction, rebuild) replaced files between reading the manifest and
                # opening them: take the new snapshot rather than one with holes
                for shard in shards:
                    shard.close()
                continue
            return cls(index_dir, manifest, shards, root)
        raise AssertionError("unreachable")

    @classmethod
    def build(
        cls,
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
        follow_links: bool = False,
        **options: Any,
    ) -> Index:
        """Index ``images_dir`` (incrementally, resumably) and open the result.

        ``follow_links`` also indexes what symlinks out of ``images_dir`` lead to. See
        ``vkd.indexer.build.build_index`` for ``options`` (``max_pixels``, ``device``).
        """
        from vkd.indexer.build import build_index

        result = build_index(images_dir, out_dir, student=student, teacher=teacher, batch_size=batch_size,
                             workers=workers, shard_size=shard_size, index_type=index_type,
                             memory_budget=memory_budget, rebuild=rebuild, show_progress=show_progress,
                             follow_links=follow_links, **options)
        index = cls.open(result.index_dir)
        index.last_build = result
        return index

    def __len__(self) -> int:
        return sum(shard.live_rows for shard in self.shards)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, live_rows={len(self)}, shards={len(self.shards)})"

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def dim(self) -> int:
        return int(self.student["dim"])

    def skipped(self) -> list[dict[str, Any]]:
        from vkd.indexer.manifest import read_skipped

        return [record.to_json() for record in read_skipped(self.path)]

    def info(self) -> dict[str, Any]:
        """What ``vkd index info`` prints: counts, models, index kinds and bytes on disk."""
        files = [self.path / MANIFEST_NAME, self.path / SKIPPED_NAME]
        for shard in self.shards:
            files += [shard.arrow_path, shard.faiss_path]
            if shard.teacher_ann is not None:
                files.append(shard.teacher_ann.path)
        kinds: dict[str, int] = {}
        for shard in self.shards:
            kinds[shard.spec.kind] = kinds.get(shard.spec.kind, 0) + 1
        return {
            "path": str(self.path),
            "images_root": str(self.images_root),
            "version": self.manifest["version"],
            "created": self.manifest.get("created"),
            "updated": self.manifest.get("updated"),
            "rows": self.rows,
            "live_rows": len(self),
            "retired_rows": self.rows - len(self),
            "shards": len(self.shards),
            "index_types": kinds,
            "student": self.student,
            "teacher": self.teacher,
            "vectors": self.vectors,
            "search_modes": search_modes(self.vectors),
            "bytes_on_disk": sum(f.stat().st_size for f in files if f.exists()),
            "skipped": int(self.manifest.get("skipped", 0)),
            "unfinished_run": self.manifest.get("unfinished_run"),
            "damaged_shards": {s.name: s.damage or f"teacher ANN: {s.teacher_damage}" for s in self.shards
                               if s.damage is not None or s.teacher_damage is not None},
            "shard_list": [{"name": s.name, "rows": s.rows, "live_rows": s.live_rows, "index": s.spec.factory}
                           for s in self.shards],
        }

    def close(self) -> None:
        """Release the files this snapshot holds (also done when it is garbage-collected)."""
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self) -> list[str]:
        """Problems found (empty when the index is sound). See ``vkd.indexer.verify``."""
        from vkd.indexer.verify import verify_index

        return verify_index(self.path)

    def compact(self, **options: Any) -> CompactResult:
        """Rewrite shards without retired rows; returns what changed. Reopen to see the result."""
        from vkd.indexer.build import compact_index

        return compact_index(self.path, **options)
