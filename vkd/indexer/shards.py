"""Stage 4 — an Arrow shard and its FAISS index on disk.

A shard is ``shard-NNNNN.arrow``: the Arrow IPC *file* format, uncompressed, one record
batch, so ``pa.memory_map`` + ``ipc.open_file`` give zero-copy columns and the vectors are
a numpy view of the mapped file. Columns:

====================  ======================================  =======================================
id                    string                                  sha256 of the path's exact bytes
                                                              (32 hex), stable
path                  string                                  relative to the manifest's images_root,
                                                              POSIX separators; always valid UTF-8:
                                                              a byte that is not UTF-8 is spelled
                                                              ``\\xNN`` (backslashreplace)
path_bytes            binary, nullable                        the exact bytes of the relative path
                                                              where it is not valid UTF-8, else null
size                  int64                                   bytes
mtime                 int64                                   st_mtime_ns (nanoseconds since epoch)
sha256                string                                  of the file's bytes
width, height         int32                                   after EXIF orientation
captured              int64, nullable                         EXIF capture time, ns since the epoch
                                                              (DateTimeOriginal, else Digitized,
                                                              else DateTime; the wall clock read as
                                                              UTC, or the real UTC instant when an
                                                              EXIF offset tag is present); null when
                                                              the file has no readable date
student_vec           fixed_size_list<float32>[d]             L2-normalised
teacher_vec           fixed_size_list<float16>[d_t]           only when indexed with a teacher
projected_vec         fixed_size_list<float16>[d_t]           only when indexed for student-index
                                                              search: student_vec through the
                                                              student's projection into a
                                                              teacher's space, L2-normalised
====================  ======================================  =======================================

File names are stored losslessly: ``path`` is what any Arrow reader (pyarrow, DuckDB,
Polars) shows, and two names can share it (``caf\\xe9.png`` in Latin-1 and a file really
called ``caf\\xe9.png``); ``path_bytes`` and the id tell them apart. vkd reads a row's path
as ``os.fsdecode(path_bytes)`` when set, else ``path`` (``relative_paths``). Shards written
before ``path_bytes`` existed lack the column; they hold UTF-8 names only and read the same.
Shards written before ``captured`` existed lack that column too: readers take every row's
capture time as null (``captured_values``), and the shard stays whole (``verify`` does not ask
for it).

``shard-NNNNN.faiss`` indexes ``student_vec`` (inner product; FAISS ids = row numbers) and
can always be rebuilt from the Arrow file, which is the source of truth.
``shard-NNNNN.teacher.faiss``, in an index whose manifest records ``vectors.teacher_vec.ann``,
indexes the first ``ann.dim`` dimensions of ``teacher_vec`` (each prefix normalised again when
it is shorter than the vector): the student-query search mode's ANN. Both are ``AnnFile``s:
one way to write, check, repair and open either.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vkd.indexer.faiss_index import IndexSpec, build_faiss
from vkd.indexer.fsutil import atomic_write_bytes
from vkd.indexer.scan import path_from_stored, stored_path

SHARD_FORMAT = "vkd-index-shard/1"
META_COLUMNS = ("id", "path", "size", "mtime", "sha256", "width", "height")
# not in META_COLUMNS: shards written before it existed lack it, and are still whole
PATH_BYTES_COLUMN = "path_bytes"
CAPTURED_COLUMN = "captured"
STUDENT_COLUMN = "student_vec"
TEACHER_COLUMN = "teacher_vec"
PROJECTED_COLUMN = "projected_vec"


@dataclass(frozen=True)
class AnnFile:
    """A FAISS index a shard carries: over which vector column, in which file
    (``<shard name>.<suffix>``) and under which keys of the manifest's shard entry."""

    column: str
    suffix: str
    file_key: str
    sha_key: str
    bytes_key: str
    spec_key: str

    def file_name(self, shard: str) -> str:
        return f"{shard}.{self.suffix}"


STUDENT_ANN = AnnFile(STUDENT_COLUMN, "faiss", "faiss", "faiss_sha256", "faiss_bytes", "index")
TEACHER_ANN = AnnFile(TEACHER_COLUMN, "teacher.faiss", "teacher_faiss", "teacher_faiss_sha256", "teacher_faiss_bytes",
                      "teacher_index")
ANN_FILES = (STUDENT_ANN, TEACHER_ANN)


def ann_rows(view: np.ndarray, rows: np.ndarray | slice | None = None, prefix: int | None = None) -> np.ndarray:
    """float32 [n, width]: what an ANN index over the vector ``view`` holds for ``rows`` (all when
    None): the first ``prefix`` dimensions, normalised again when shorter than the vector (a
    Matryoshka prefix is an embedding of its own, compared by cosine), else the vectors as stored."""
    picked = view if rows is None else view[rows]
    width = view.shape[1] if prefix is None else int(prefix)
    out = np.asarray(picked[:, :width], dtype=np.float32)
    if width < view.shape[1]:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def shard_schema(student_dim: int, teacher_dim: int | None = None,
                 metadata: Mapping[str, str] | None = None, projected_dim: int | None = None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field(PATH_BYTES_COLUMN, pa.binary(), nullable=True),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field(CAPTURED_COLUMN, pa.int64(), nullable=True),
        pa.field(STUDENT_COLUMN, pa.list_(pa.float32(), student_dim), nullable=False),
    ]
    if teacher_dim is not None:
        fields.append(pa.field(TEACHER_COLUMN, pa.list_(pa.float16(), teacher_dim), nullable=False))
    if projected_dim is not None:
        fields.append(pa.field(PROJECTED_COLUMN, pa.list_(pa.float16(), projected_dim), nullable=False))
    meta = {"vkd.format": SHARD_FORMAT, "vkd.mtime_unit": "ns",
            "vkd.path_base": "images_root in manifest.json"}
    meta.update(metadata or {})
    return pa.schema(fields, metadata=meta)


def vector_array(vectors: np.ndarray, dtype: np.dtype, dim: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(vectors, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def make_record_batch(columns: Mapping[str, Sequence[Any]], student_vecs: np.ndarray,
                      teacher_vecs: np.ndarray | None = None,
                      metadata: Mapping[str, str] | None = None,
                      projected_vecs: np.ndarray | None = None) -> pa.RecordBatch:
    """One record batch in the shard schema from metadata columns and vector matrices.

    ``columns["path"]`` holds relative paths as the scan gives them (os.fsdecode form, or
    bytes); they are stored as ``path`` text plus ``path_bytes`` (see the module docstring).
    ``columns["captured"]`` may be left out (all null).
    """
    student_dim = int(student_vecs.shape[1])
    teacher_dim = int(teacher_vecs.shape[1]) if teacher_vecs is not None else None
    projected_dim = int(projected_vecs.shape[1]) if projected_vecs is not None else None
    schema = shard_schema(student_dim, teacher_dim, metadata, projected_dim)
    stored = [stored_path(os.fsdecode(p)) for p in columns["path"]]
    values = {CAPTURED_COLUMN: [None] * len(stored), **columns, "path": [text for text, _ in stored],
              PATH_BYTES_COLUMN: [raw for _, raw in stored]}
    arrays = [pa.array(list(values[field.name]), type=field.type) for field in schema
              if field.name in META_COLUMNS or field.name in (PATH_BYTES_COLUMN, CAPTURED_COLUMN)]
    arrays.append(vector_array(student_vecs, np.float32, student_dim))
    if teacher_vecs is not None:
        arrays.append(vector_array(teacher_vecs, np.float16, teacher_dim))
    if projected_vecs is not None:
        arrays.append(vector_array(projected_vecs, np.float16, projected_dim))
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"shard columns have different lengths: {sorted(lengths)}")
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def relative_paths(table: pa.Table | pa.RecordBatch) -> list[str]:
    """Each row's path relative to images_root as a str that opens the file (os.fsdecode form)."""
    texts = table.column("path").to_pylist()
    if PATH_BYTES_COLUMN not in table.column_names:
        return [path_from_stored(text) for text in texts]
    raws = table.column(PATH_BYTES_COLUMN).to_pylist()
    return [path_from_stored(text, raw) for text, raw in zip(texts, raws, strict=True)]


def captured_values(table: pa.Table | pa.RecordBatch) -> pa.Array | pa.ChunkedArray:
    """The ``captured`` column, or all nulls for a shard written before it existed."""
    if CAPTURED_COLUMN in table.column_names:
        return table.column(CAPTURED_COLUMN)
    return pa.nulls(table.num_rows, type=pa.int64())


def arrow_bytes(batch: pa.RecordBatch) -> pa.Buffer:
    """The IPC file bytes: uncompressed, exactly one record batch."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def open_arrow(path: Path) -> pa.Table:
    """The shard's table, memory-mapped: no column is copied into RAM."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def vector_view(table: pa.Table, column: str) -> np.ndarray:
    """A zero-copy numpy [n, d] view of a fixed-size-list column of a one-chunk table."""
    chunked = table.column(column)
    dim = chunked.type.list_size
    if chunked.num_chunks == 0:
        return np.zeros((0, dim), dtype=chunked.type.value_type.to_pandas_dtype())
    if chunked.num_chunks == 1:
        # flatten() honours the array's offset; .values would not if the array were a slice
        flat = chunked.chunk(0).flatten().to_numpy(zero_copy_only=True)
    else:  # not written by vkd (one batch per shard); correct but a copy
        flat = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=True) for chunk in chunked.chunks])
    return flat.reshape(-1, dim)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_shard(out_dir: Path, name: str, batch: pa.RecordBatch, spec: IndexSpec, *,
                teacher_spec: IndexSpec | None = None, teacher_ann_dim: int | None = None) -> dict[str, Any]:
    """Write ``name.arrow`` and ``name.faiss`` (each atomically) and return the manifest entry;
    with ``teacher_spec``, also ``name.teacher.faiss`` over the first ``teacher_ann_dim``
    dimensions of ``teacher_vec`` (``write_ann``).

    The files are not part of the index until a manifest listing the entry is committed.
    """
    data = arrow_bytes(batch)
    arrow_path = out_dir / f"{name}.arrow"
    atomic_write_bytes(arrow_path, memoryview(data))
    arrow_sha = hashlib.sha256(memoryview(data)).hexdigest()
    entry: dict[str, Any] = {
        "name": name,
        "arrow": arrow_path.name,
        "rows": batch.num_rows,
        "arrow_sha256": arrow_sha,
        "arrow_bytes": data.size,
        "retired": [],
        "created": now_iso(),
    }
    table = pa.Table.from_batches([batch])
    write_ann(out_dir, entry, table, STUDENT_ANN, spec)
    if teacher_spec is not None:
        write_ann(out_dir, entry, table, TEACHER_ANN, teacher_spec, teacher_ann_dim)
    return entry


def write_ann(out_dir: Path, entry: dict[str, Any], table: pa.Table, ann: AnnFile, spec: IndexSpec,
              prefix: int | None = None) -> None:
    """Build ``ann``'s FAISS index of the shard ``entry`` over ``table``'s vectors (their first
    ``prefix`` dimensions), write its file atomically and record file, checksum, size and spec
    in ``entry`` (in place; committed with the manifest). How shards get their indexes, how a
    damaged one is rebuilt, and how an index gains a teacher ANN."""
    path, sha, size = write_faiss(out_dir, entry["name"], ann_rows(vector_view(table, ann.column), prefix=prefix),
                                  spec, suffix=ann.suffix)
    entry.update({ann.file_key: path.name, ann.sha_key: sha, ann.bytes_key: size, ann.spec_key: spec.to_dict()})


def write_faiss(out_dir: Path, name: str, vectors: np.ndarray, spec: IndexSpec,
                suffix: str = STUDENT_ANN.suffix) -> tuple[Path, str, int]:
    """Build the FAISS index ``spec`` over ``vectors`` and write ``name.<suffix>`` atomically.

    Returns (path, sha256, size in bytes) for the manifest entry. Also how a missing or
    damaged FAISS file is rebuilt from its Arrow shard.
    """
    import faiss

    faiss_data = faiss.serialize_index(build_faiss(vectors, spec))
    faiss_path = out_dir / f"{name}.{suffix}"
    atomic_write_bytes(faiss_path, memoryview(faiss_data))
    return faiss_path, hashlib.sha256(faiss_data).hexdigest(), int(faiss_data.size)
