"""Stage 5 — ``manifest.json``: the one file that says what the index is.

A shard exists for readers only once a manifest listing it has been committed, and a
commit is an atomic replace (``fsutil.atomic_write``), so at any instant, including right
after a kill -9, the directory holds one consistent index: the last committed manifest and
the files it lists. Anything else matching the index's file patterns is a leftover of an
interrupted run and is removed by the next writer.

Layout (``version`` 1)::

    {"format": "vkd-index", "version": 1, "created": ISO-8601, "updated": ISO-8601,
     "images_root": "/abs/path/of/the/images",
     "student": {"name", "fingerprint", "dim", "family"}, "teacher": {...} | null,
     "build": {"index_type", "memory_budget", "shard_size", "max_pixels"},
     "shards": [{"name", "arrow", "faiss", "rows", "arrow_sha256", "faiss_sha256",
                 "arrow_bytes", "faiss_bytes", "index": IndexSpec, "retired": [ids], "created"}],
     "next_shard": int, "rows": int, "live_rows": int, "skipped": int}

``retired`` lists, per shard, the ids of rows whose file was deleted or changed after the
shard was written; readers never return them and ``vkd index compact`` drops them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vkd.indexer.fsutil import TMP_MARKER, atomic_write_bytes
from vkd.indexer.scan import SkipRecord
from vkd.indexer.shards import now_iso

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
FORMAT = "vkd-index"
VERSION = 1
SHARD_FILE = re.compile(r"^shard-\d{5,}\.(arrow|faiss)$")
MODEL_KEYS = ("name", "fingerprint", "dim", "family")
SHARD_KEYS = ("name", "arrow", "faiss", "rows", "arrow_sha256", "faiss_sha256", "index", "retired")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or not in a format this vkd understands."""


def model_record(described: dict[str, Any]) -> dict[str, Any]:
    return {key: described.get(key) for key in MODEL_KEYS}


def new_manifest(images_root: Path, student: dict[str, Any], teacher: dict[str, Any] | None,
                 build: dict[str, Any]) -> dict[str, Any]:
    stamp = now_iso()
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": stamp,
        "updated": stamp,
        "images_root": str(images_root),
        "student": model_record(student),
        "teacher": model_record(teacher) if teacher is not None else None,
        "build": dict(build),
        "shards": [],
        "next_shard": 0,
        "rows": 0,
        "live_rows": 0,
        "skipped": 0,
    }


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ManifestError(f"{path}: {message}")


def validate(manifest: Any, path: Path) -> dict[str, Any]:
    _require(isinstance(manifest, dict), path, "expected a JSON object")
    _require(manifest.get("format") == FORMAT, path,
             f"key 'format' is {manifest.get('format')!r}, expected {FORMAT!r}: not a vkd index manifest")
    version = manifest.get("version")
    _require(isinstance(version, int), path, f"key 'version' is {version!r}, expected an integer")
    _require(version <= VERSION, path,
             f"version {version} is newer than this vkd reads (up to {VERSION}); upgrade vkd")
    for key in ("images_root", "student", "shards"):
        _require(key in manifest, path, f"missing key {key!r}")
    for role in ("student", "teacher"):
        model = manifest.get(role)
        if model is None and role == "teacher":
            continue
        _require(isinstance(model, dict) and all(k in model for k in MODEL_KEYS), path,
                 f"key {role!r} must hold {', '.join(MODEL_KEYS)}; found {model!r}")
    _require(isinstance(manifest["shards"], list), path, "key 'shards' must be a list")
    for i, shard in enumerate(manifest["shards"]):
        missing = [k for k in SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        _require(not missing, path, f"shards[{i}] lacks {', '.join(missing)}")
    return manifest


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The committed manifest of ``index_dir``, validated."""
    path = Path(index_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest here; {index_dir} is not a vkd index "
                            "(create one with `vkd index IMAGES_DIR --model STUDENT --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: cannot read: {error}") from None
    return validate(manifest, path)


def refresh_counts(manifest: dict[str, Any]) -> None:
    rows = sum(int(s["rows"]) for s in manifest["shards"])
    manifest["rows"] = rows
    manifest["live_rows"] = rows - sum(len(s["retired"]) for s in manifest["shards"])


def commit_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace ``manifest.json``: from this moment its shards are the index."""
    refresh_counts(manifest)
    manifest["updated"] = now_iso()
    data = json.dumps(manifest, indent=1, sort_keys=False).encode()
    atomic_write_bytes(Path(index_dir) / MANIFEST_NAME, data)


def listed_files(manifest: dict[str, Any]) -> set[str]:
    names = set()
    for shard in manifest["shards"]:
        names.update((shard["arrow"], shard["faiss"]))
    return names


def remove_unlisted(index_dir: Path, manifest: dict[str, Any] | None) -> list[str]:
    """Delete shard files no committed manifest lists and temporaries of dead runs.

    Call only while holding the writer lock. Files that do not look like the index's own
    are never touched.
    """
    keep = listed_files(manifest) if manifest is not None else set()
    removed = []
    for path in Path(index_dir).iterdir():
        name = path.name
        ours = SHARD_FILE.match(name) or (TMP_MARKER in name and (
            SHARD_FILE.match(name.split(TMP_MARKER)[0]) or name.split(TMP_MARKER)[0] in (MANIFEST_NAME, SKIPPED_NAME)))
        if ours and name not in keep and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(name)
    return sorted(removed)


def read_skipped(index_dir: Path) -> list[SkipRecord]:
    path = Path(index_dir) / SKIPPED_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(SkipRecord.from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the file is a record for people and a cache for us; a bad line only costs a retry
    return records


def write_skipped(index_dir: Path, records: Iterable[SkipRecord]) -> int:
    ordered = sorted(records, key=lambda r: r.path)
    data = "".join(json.dumps(r.to_json()) + "\n" for r in ordered).encode()
    atomic_write_bytes(Path(index_dir) / SKIPPED_NAME, data)
    return len(ordered)
