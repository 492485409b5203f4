"""Reading an index: ``Index`` (a consistent snapshot of a committed manifest) and ``Shard``.

``Index.open`` reads ``manifest.json`` once and memory-maps the Arrow shards it lists;
later commits by a running indexer do not change what an open ``Index`` sees (files it maps
stay valid even after a compaction deletes them). FAISS indexes load on first search.
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

from vkd.indexer.faiss_index import FaissSearcher, IndexSpec, read_faiss
from vkd.indexer.manifest import MANIFEST_NAME, SKIPPED_NAME, ManifestError, read_manifest
from vkd.indexer.shards import META_COLUMNS, STUDENT_COLUMN, TEACHER_COLUMN, open_arrow, vector_view

if TYPE_CHECKING:
    from vkd.indexer.build import BuildResult, CompactResult
    from vkd.models.base import Encoder


class Shard:
    """One Arrow shard (memory-mapped) and its FAISS index."""

    def __init__(self, index_dir: Path, entry: dict[str, Any], images_root: Path) -> None:
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
        self._searcher: FaissSearcher | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, rows={self.rows}, live={self.live_rows}, index={self.spec.factory})"

    def __len__(self) -> int:
        return self.live_rows

    @property
    def searcher(self) -> FaissSearcher:
        if self._searcher is None:
            with self._lock:
                if self._searcher is None:
                    index = read_faiss(self.faiss_path)
                    if index.ntotal != self.rows or index.d != self.dim:
                        raise ManifestError(
                            f"{self.faiss_path}: ntotal={index.ntotal}, d={index.d} but the Arrow shard has "
                            f"{self.rows} rows of dim {self.dim}; rebuild it with `vkd index compact --reindex`")
                    self._searcher = FaissSearcher(index, self.spec, self._student, self.retired_rows)
        return self._searcher

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
        return self.searcher.search(np.ascontiguousarray(queries), int(k))

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

    def records(self, rows: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """Row metadata: id, path (absolute), relpath, size, mtime (ns), sha256, width, height."""
        rows = self._rows(rows)
        taken = self.table.select(list(META_COLUMNS)).take(pa.array(rows, type=pa.int64())).to_pylist()
        for row, record in zip(rows.tolist(), taken, strict=True):
            record["relpath"] = record["path"]
            record["path"] = str(self.images_root.joinpath(*record["relpath"].split("/")))
            record["shard"] = self.name
            record["row"] = row
        return taken

    def live_mask(self) -> np.ndarray:
        mask = np.ones(self.rows, dtype=bool)
        mask[self.retired_rows] = False
        return mask


class Index:
    """A vkd index directory: manifest + shards. Open with ``Index.open``, make with ``Index.build``."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard], images_root: Path) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.images_root = images_root
        self.student: dict[str, Any] = manifest["student"]
        self.teacher: dict[str, Any] | None = manifest.get("teacher")
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
            try:
                shards = [Shard(index_dir, entry, root) for entry in manifest["shards"]]
            except FileNotFoundError as error:
                # a compaction may have committed and removed these files since we read the manifest
                if attempt < 2 and read_manifest(index_dir) != manifest:
                    continue
                raise ManifestError(f"{index_dir / MANIFEST_NAME}: lists {error.filename}, which does not exist; "
                                    f"run `vkd index verify {index_dir}`, and re-index with --rebuild") from None
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
        **options: Any,
    ) -> Index:
        """Index ``images_dir`` (incrementally, resumably) and open the result.

        See ``vkd.indexer.build.build_index`` for ``options`` (``max_pixels``, ``device``).
        """
        from vkd.indexer.build import build_index

        result = build_index(images_dir, out_dir, student=student, teacher=teacher, batch_size=batch_size,
                             workers=workers, shard_size=shard_size, index_type=index_type,
                             memory_budget=memory_budget, rebuild=rebuild, show_progress=show_progress,
                             **options)
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
            "bytes_on_disk": sum(f.stat().st_size for f in files if f.exists()),
            "skipped": int(self.manifest.get("skipped", 0)),
            "shard_list": [{"name": s.name, "rows": s.rows, "live_rows": s.live_rows, "index": s.spec.factory}
                           for s in self.shards],
        }

    def verify(self) -> list[str]:
        """Problems found (empty when the index is sound). See ``vkd.indexer.verify``."""
        from vkd.indexer.verify import verify_index

        return verify_index(self.path)

    def compact(self, **options: Any) -> CompactResult:
        """Rewrite shards without retired rows; returns what changed. Reopen to see the result."""
        from vkd.indexer.build import compact_index

        return compact_index(self.path, **options)
