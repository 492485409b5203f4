"""``vkd index verify``: does the index on disk agree with its manifest?

Checks, per shard: the files exist with the recorded sizes and sha256 checksums; the Arrow
file has one record batch, the manifest's row count and the expected columns and vector
dimensions (``captured``, when present, is int64: shards written before it lack it and are
whole); the FAISS index has ``ntotal`` equal to the Arrow rows, the student dimension and the
inner-product metric; the vectors are finite and unit length; retired ids exist.
Across shards: every id is live at most once, and the manifest's totals add up.

``repair_shards`` is what ``vkd index`` runs before every update (cheap checks: the files
exist with the recorded sizes) and ``vkd index verify --repair`` runs with checksums: a bad
FAISS file (``shard-N.faiss``, or the teacher ANN's ``shard-N.teacher.faiss``) is rebuilt from
its Arrow shard, the source of truth; a shard whose Arrow file is
bad is dropped from the manifest, so the next ``vkd index`` run re-encodes its images.
The caller holds the writer lock and commits the manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vkd.indexer.faiss_index import IndexSpec
from vkd.indexer.fsutil import sha256_file
from vkd.indexer.manifest import MANIFEST_NAME, ManifestError, read_manifest, vector_spaces
from vkd.indexer.shards import (
    ANN_FILES,
    CAPTURED_COLUMN,
    META_COLUMNS,
    PROJECTED_COLUMN,
    STUDENT_COLUMN,
    TEACHER_ANN,
    TEACHER_COLUMN,
    AnnFile,
    open_arrow,
    vector_view,
    write_ann,
)

NORM_TOLERANCE = 1e-3


def _check_vectors(problems: list[str], label: str, table: pa.Table, column: str, dim: int | None,
                   tolerance: float) -> None:
    if column not in table.column_names:
        problems.append(f"{label}: no {column} column")
        return
    kind = table.schema.field(column).type
    if not pa.types.is_fixed_size_list(kind) or (dim is not None and kind.list_size != dim):
        problems.append(f"{label}: {column} is {kind}, expected fixed_size_list of dim {dim}")
        return
    vectors = vector_view(table, column)
    if not len(vectors):
        return
    values = vectors.astype(np.float32)
    if not np.isfinite(values).all():
        problems.append(f"{label}: {column} holds NaN or infinite values")
        return
    norms = np.linalg.norm(values, axis=1)
    worst = float(np.abs(norms - 1).max())
    if worst > tolerance:
        problems.append(f"{label}: {column} is not L2-normalised (|norm - 1| up to {worst:.3g})")


def verify_index(index_dir: str | os.PathLike[str]) -> list[str]:
    """Every problem found, as one line each naming the file at fault; empty when sound."""
    import faiss

    path = Path(index_dir)
    try:
        manifest = read_manifest(path)
    except ManifestError as error:
        return [str(error)]
    problems: list[str] = []
    student_dim = int(manifest["student"]["dim"])
    teacher = manifest.get("teacher")
    vectors = vector_spaces(manifest)
    # the dimension each FAISS file must have: the student's, the teacher ANN's prefix
    ann_dims = {ann: ann_dim(manifest, ann) for ann in ANN_FILES}
    live_ids: dict[str, str] = {}
    total_rows = total_live = 0
    for shard in manifest["shards"]:
        name = shard["name"]
        arrow_path = path / shard["arrow"]
        sound = True
        files = [(arrow_path, "arrow")] + [(path / shard[a.file_key], a.file_key) for a in ANN_FILES if a.file_key in shard]
        for file_path, key in files:
            if not file_path.is_file():
                problems.append(f"{file_path}: listed in the manifest but missing")
                sound = False
                continue
            expected_size = shard.get(f"{key}_bytes")
            if expected_size is not None and file_path.stat().st_size != int(expected_size):
                problems.append(f"{file_path}: {file_path.stat().st_size} bytes, manifest says {expected_size}")
                sound = False
            elif sha256_file(file_path) != shard[f"{key}_sha256"]:
                problems.append(f"{file_path}: sha256 differs from the manifest's (file changed or corrupt)")
                sound = False
        if not sound:
            continue
        try:
            reader = ipc.open_file(pa.memory_map(str(arrow_path), "r"))
            table = reader.read_all()
        except (OSError, pa.ArrowInvalid) as error:
            problems.append(f"{arrow_path}: not a readable Arrow IPC file: {error}")
            continue
        label = str(arrow_path)
        if reader.num_record_batches != 1:
            problems.append(f"{label}: {reader.num_record_batches} record batches, expected 1")
        if table.num_rows != int(shard["rows"]):
            problems.append(f"{label}: {table.num_rows} rows, manifest says {shard['rows']}")
        missing = [c for c in META_COLUMNS if c not in table.column_names]
        if missing:
            problems.append(f"{label}: missing columns {', '.join(missing)}")
            continue
        if CAPTURED_COLUMN in table.column_names and table.schema.field(CAPTURED_COLUMN).type != pa.int64():
            problems.append(f"{label}: {CAPTURED_COLUMN} is {table.schema.field(CAPTURED_COLUMN).type}, "
                            "expected int64 (ns since the epoch)")
        _check_vectors(problems, label, table, STUDENT_COLUMN, student_dim, NORM_TOLERANCE)
        if teacher is not None:
            # float16 storage: ~1e-3 relative error per component
            _check_vectors(problems, label, table, TEACHER_COLUMN, int(teacher["dim"]), 2e-2)
        elif TEACHER_COLUMN in table.column_names:
            problems.append(f"{label}: has {TEACHER_COLUMN} but the manifest records no teacher")
        if "projected_vec" in vectors:
            _check_vectors(problems, label, table, PROJECTED_COLUMN, int(vectors["projected_vec"]["dim"]), 2e-2)
        ids = table.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            problems.append(f"{label}: duplicate ids")
        retired = set(shard["retired"])
        unknown = retired - set(ids)
        if unknown:
            problems.append(f"{label}: {len(unknown)} retired ids are not in the shard")
        for row_id in ids:
            if row_id in retired:
                continue
            if row_id in live_ids:
                problems.append(f"{label}: id {row_id} is also live in {live_ids[row_id]}")
            live_ids[row_id] = name
        total_rows += table.num_rows
        total_live += table.num_rows - len(retired & set(ids))
        for ann, dim in ann_dims.items():
            if dim is None:
                continue
            faiss_path = path / shard[ann.file_key]
            try:
                index = faiss.read_index(str(faiss_path))
            except RuntimeError as error:
                problems.append(f"{faiss_path}: not a readable FAISS index: {error}")
                continue
            if index.ntotal != table.num_rows:
                problems.append(f"{faiss_path}: ntotal={index.ntotal}, the Arrow shard has {table.num_rows} rows")
            if index.d != dim:
                what = "the student's" if ann.column == STUDENT_COLUMN else "the teacher ANN's (vectors.teacher_vec.ann)"
                problems.append(f"{faiss_path}: dimension {index.d}, {what} is {dim}")
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                problems.append(f"{faiss_path}: metric {index.metric_type}, expected inner product")
    if not problems:
        if manifest.get("rows") is not None and int(manifest["rows"]) != total_rows:
            problems.append(f"{path / MANIFEST_NAME}: rows={manifest['rows']}, shards hold {total_rows}")
        if manifest.get("live_rows") is not None and int(manifest["live_rows"]) != total_live:
            problems.append(f"{path / MANIFEST_NAME}: live_rows={manifest['live_rows']}, shards hold {total_live}")
    return problems


@dataclass
class RepairResult:
    rebuilt_faiss: list[str] = field(default_factory=list)
    dropped_shards: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rebuilt_faiss or self.dropped_shards)


def _file_sound(path: Path, size: Any, sha256: str | None) -> bool:
    try:
        actual = path.stat().st_size
    except OSError:
        return False
    if size is not None and actual != int(size):
        return False
    return sha256 is None or sha256_file(path) == sha256


def _arrow_sound(path: Path, entry: dict[str, Any], deep: bool) -> bool:
    if not _file_sound(path, entry.get("arrow_bytes"), entry["arrow_sha256"] if deep else None):
        return False
    try:
        return open_arrow(path).num_rows == int(entry["rows"])
    except (OSError, pa.ArrowInvalid):
        return False


def ann_dim(manifest: dict[str, Any], ann: AnnFile) -> int | None:
    """The dimension of ``ann``'s FAISS files in this index; None when its shards have none."""
    if ann.column == STUDENT_COLUMN:
        return int(manifest["student"]["dim"])
    if ann is TEACHER_ANN:
        record = (vector_spaces(manifest).get("teacher_vec") or {}).get("ann")
        return int(record["dim"]) if record else None
    return None  # pragma: no cover - every AnnFile is one of the above


def repair_shards(index_dir: Path, manifest: dict[str, Any], *, deep: bool = False) -> RepairResult:
    """Rebuild bad FAISS files (the student's and the teacher ANN's) from their Arrow shards and
    drop shards whose Arrow file is bad, updating ``manifest`` in place (not committed).
    ``deep`` compares checksums too. ``rebuilt_faiss`` names the files rebuilt."""
    result = RepairResult()
    kept = []
    for entry in manifest["shards"]:
        arrow_path = index_dir / entry["arrow"]
        if not _arrow_sound(arrow_path, entry, deep):
            result.dropped_shards.append(entry["name"])
            continue
        kept.append(entry)
        table = None
        for ann in ANN_FILES:
            if ann.file_key not in entry or _file_sound(index_dir / entry[ann.file_key], entry.get(ann.bytes_key),
                                                         entry[ann.sha_key] if deep else None):
                continue
            table = table if table is not None else open_arrow(arrow_path)
            prefix = ann_dim(manifest, ann) if ann is not ANN_FILES[0] else None
            write_ann(index_dir, entry, table, ann, IndexSpec.from_dict(entry[ann.spec_key]), prefix)
            result.rebuilt_faiss.append(entry["name"] if ann is ANN_FILES[0] else ann.file_name(entry["name"]))
    manifest["shards"] = kept
    return result


def repair_index(index_dir: str | os.PathLike[str]) -> RepairResult:
    """``vkd index verify --repair``: ``repair_shards`` with checksums, under the writer lock,
    committed in one atomic manifest replace."""
    from vkd.indexer.fsutil import writer_lock
    from vkd.indexer.manifest import commit_manifest, remove_unlisted

    path = Path(index_dir).expanduser().resolve()
    with writer_lock(path):
        manifest = read_manifest(path)
        remove_unlisted(path, manifest)
        result = repair_shards(path, manifest, deep=True)
        if result:
            commit_manifest(path, manifest)
            remove_unlisted(path, manifest)
    return result
