"""Stage 5 — ``manifest.json``: the one file that says what the index is.

A shard exists for readers only once a manifest listing it has been committed, and a
commit is an atomic replace (``fsutil.atomic_write``), so at any instant, including right
after a kill -9, the directory holds one consistent index: the last committed manifest and
the files it lists. Anything else matching the index's file patterns is a leftover of an
interrupted run and is removed by the next writer.

Layout (``version`` 1)::

    {"format": "vkd-index", "version": 1, "created": ISO-8601, "updated": ISO-8601,
     "images_root": "/abs/path/of/the/images",
     "student": {"name", "fingerprint", "dim", "family", "options"}, "teacher": {...} | null,
     "build": {"index_type", "memory_budget", "shard_size", "max_pixels", "follow_links"},
     "shards": [{"name", "arrow", "faiss", "rows", "arrow_sha256", "faiss_sha256",
                 "arrow_bytes", "faiss_bytes", "index": IndexSpec, "retired": [ids], "created"}],
     "next_shard": int, "rows": int, "live_rows": int, "skipped": int,
     "unfinished_run": {"started", "pid", "to_encode", "rebuild"},  # only while a run is under way
     "vectors": {"student_vec": {"space", "dim"}, "teacher_vec": {"space", "dim", "ann": {"dim"}},
                 "projected_vec": {"space", "dim", "teacher": {...}, "projection_sha256"}}}

A shard entry of an index with a teacher ANN (``vectors.teacher_vec.ann``) also holds
``"teacher_faiss", "teacher_faiss_sha256", "teacher_faiss_bytes", "teacher_index"``: the
FAISS index over the first ``ann.dim`` dimensions of its teacher vectors (student-query
search), kept exactly like ``faiss`` (``shards.ANN_FILES``). Every shard has one, or none does.

``vectors`` says which vector columns every shard holds and in which space each is
(``"student:<fingerprint>"`` or ``"teacher:<fingerprint>"``): ``student_vec`` always (the FAISS
index's), ``teacher_vec`` with a teacher, ``projected_vec`` for the student-index search mode
(student image vectors mapped into a teacher's space by the student's projection; ``teacher``
records the model whose text tower encodes the queries). Manifests written before the key
existed have none: ``vector_spaces`` derives it from ``student`` and ``teacher``, which is all
they can hold.

Every open validates the whole file (``validate``): a shard's files are always
``<name>.arrow`` / ``<name>.faiss`` in the index directory, counts are integers, index kinds
are known. ``unfinished_run`` is committed before a run encodes anything and dropped by its
final commit, so an index left by a killed run says so (``vkd index verify``).

A model's ``options`` are the ``load_encoder`` keywords that reopen it as it encoded the index
(``Encoder.load_options``): for Qwen3-VL its ``query_instruction`` (what search gives text
queries) and ``document_instruction`` (what the indexed images got), Matryoshka size and
limits. Manifests written before the key existed have none (= the model's defaults).

``retired`` lists, per shard, the ids of rows whose file was deleted or changed after the
shard was written; readers never return them and ``vkd index compact`` drops them.

``skipped.jsonl`` holds one ASCII JSON object per line: ``{"path", "reason", "size",
"mtime"}``, plus ``"max_pixels"`` for files rejected for their size and ``"path_base64"`` (the
exact bytes) for a name that is not valid UTF-8, whose ``"path"`` is then its readable form
(see ``scan.stored_path``). Reading it never fails a run: a line that does not parse is dropped.
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
SHARD_FILE = re.compile(r"^shard-\d{5,}\.(arrow|faiss|teacher\.faiss)$")
SHARD_NAME = re.compile(r"^shard-\d{5,}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# = vkd.indexer.faiss_index.INDEX_TYPES less "auto"; not imported, to keep this module light
INDEX_KINDS = ("flat", "hnsw", "ivfpq")
MODEL_KEYS = ("name", "fingerprint", "dim", "family")
# The load_encoder options a model record may hold (Encoder.load_options of every backend):
# preprocessing only. A manifest is data, so nothing in it may switch on trust_remote_code,
# allow_pickle or any other way of running code from a checkpoint.
MODEL_OPTIONS = frozenset({"query_instruction", "document_instruction", "matryoshka_dim", "max_text_length",
                           "min_pixels", "max_pixels", "max_length", "image_buckets"})
SHARD_KEYS = ("name", "arrow", "faiss", "rows", "arrow_sha256", "faiss_sha256", "index", "retired")
# = shards.TEACHER_ANN's keys: all or none in a shard entry
TEACHER_ANN_KEYS = ("teacher_faiss", "teacher_faiss_sha256", "teacher_faiss_bytes", "teacher_index")
VECTOR_COLUMNS = ("student_vec", "teacher_vec", "projected_vec")  # = the shards' vector columns
SPACE = re.compile(r"^(student|teacher):[^\s]+$")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or not in a format this vkd understands."""


def model_record(described: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of a model, its name one that resolves from any directory:
    a local model directory by its absolute path, a hub id as the id."""
    record = {key: described.get(key) for key in MODEL_KEYS}
    if described.get("options") is not None:
        record["options"] = {key: value for key, value in described["options"].items() if key in MODEL_OPTIONS}
    name = record["name"]
    if isinstance(name, str) and name and Path(name).expanduser().exists():
        record["name"] = str(Path(name).expanduser().resolve())
    return record


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
        "vectors": vector_spaces({"student": model_record(student),
                                  "teacher": model_record(teacher) if teacher is not None else None}),
        "shards": [],
        "next_shard": 0,
        "rows": 0,
        "live_rows": 0,
        "skipped": 0,
    }


def vector_spaces(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Which vector columns the index's shards hold and in which space (the ``vectors`` key, or
    for a manifest from before it, what its ``student`` and ``teacher`` records imply)."""
    if manifest.get("vectors") is not None:
        return manifest["vectors"]
    student = manifest["student"]
    vectors = {"student_vec": {"space": f"student:{student['fingerprint']}", "dim": int(student["dim"])}}
    teacher = manifest.get("teacher")
    if teacher is not None:
        vectors["teacher_vec"] = {"space": f"teacher:{teacher['fingerprint']}", "dim": int(teacher["dim"])}
    return vectors


def search_modes(vectors: dict[str, Any]) -> list[str]:
    """The search modes (``vkd.retrieval.modes.MODES``) whose vectors ``vectors`` lists."""
    modes = ["two-stage"]
    if "teacher_vec" in vectors:
        modes.append("student-query")
    if "projected_vec" in vectors:
        modes.append("student-index")
    return modes


def projected_record(projection: Any) -> dict[str, Any]:
    """The ``vectors.projected_vec`` entry for a ``vkd.models.projection.Projection``."""
    return {"space": projection.space, "dim": projection.dim, "teacher": model_record(projection.teacher),
            "projection_sha256": projection.sha256}


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ManifestError(f"{path}: {message}")


def _is_int(value: Any, minimum: int = 0) -> bool:
    # bool is an int to Python, never to the manifest
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_model(model: Any, role: str, path: Path) -> None:
    _require(isinstance(model, dict) and all(k in model for k in MODEL_KEYS), path,
             f"key {role!r} must hold {', '.join(MODEL_KEYS)}; found {model!r:.200}")
    _require(isinstance(model["name"], str) and model["name"] != "", path,
             f"{role}.name is {model['name']!r:.80}, expected a model directory or hub id")
    _require(isinstance(model["fingerprint"], str) and model["fingerprint"] != "", path,
             f"{role}.fingerprint is {model['fingerprint']!r:.80}, expected a string")
    _require(_is_int(model["dim"], 1), path, f"{role}.dim is {model['dim']!r:.80}, expected a positive integer")
    _require(model["family"] is None or isinstance(model["family"], str), path,
             f"{role}.family is {model['family']!r:.80}, expected a string")
    options = model.get("options", {})
    # they become keyword arguments of load_encoder: known names only, values JSON scalars
    _require(isinstance(options, dict) and set(options) <= MODEL_OPTIONS
             and all(v is None or (isinstance(v, (str, int)) and not isinstance(v, bool)) for v in options.values()),
             path, f"{role}.options is {options!r:.120}, expected an object of model options, each one of "
             f"{', '.join(sorted(MODEL_OPTIONS))} with a string, integer or null value")


# What search and build read from an index spec's params: each an integer within bounds that
# FAISS accepts (C int), so no value from the file reaches FAISS unchecked.
_INT_PARAMS = {"M": (2, 512), "efConstruction": (1, 1 << 20), "efSearch": (1, 1 << 20), "nlist": (1, 1 << 24),
               "nprobe": (1, 1 << 24), "m": (1, 4096), "nbits": (1, 16), "rescore_factor": (1, 1000)}


def _check_index_spec(spec: Any, where: str, path: Path) -> None:
    _require(isinstance(spec, dict) and spec.get("kind") in INDEX_KINDS and isinstance(spec.get("factory"), str)
             and isinstance(spec.get("params", {}), dict), path,
             f"{where} is {spec!r:.120}, expected {{kind: {'|'.join(INDEX_KINDS)}, factory: str, params: {{}}}}")
    _require("estimated_bytes" not in spec or _is_int(spec["estimated_bytes"]), path,
             f"{where}.estimated_bytes is {spec.get('estimated_bytes')!r:.80}, expected an integer >= 0")
    _require(isinstance(spec.get("reason", ""), str), path, f"{where}.reason must be a string")
    params = spec.get("params", {})
    for key, (low, high) in _INT_PARAMS.items():
        value = params.get(key)
        _require(key not in params or (_is_int(value) and low <= value <= high), path,
                 f"{where}.params.{key} is {value!r:.80}, expected an integer from {low} to {high}")
    _require(isinstance(params.get("rescore", False), bool), path,
             f"{where}.params.rescore is {params.get('rescore')!r:.80}, expected true or false")
    _require(params.get("metric", "inner_product") == "inner_product", path,
             f"{where}.params.metric is {params.get('metric')!r:.80}, expected 'inner_product'")


def _check_vectors(manifest: dict[str, Any], path: Path) -> None:
    vectors = manifest.get("vectors")
    if vectors is None:
        return  # written before the key: vector_spaces derives it
    _require(isinstance(vectors, dict) and set(vectors) <= set(VECTOR_COLUMNS) and "student_vec" in vectors, path,
             f"key 'vectors' is {vectors!r:.120}, expected an object with student_vec and optionally "
             f"{', '.join(VECTOR_COLUMNS[1:])}")
    for column, entry in vectors.items():
        where = f"vectors.{column}"
        _require(isinstance(entry, dict) and isinstance(entry.get("space"), str)
                 and SPACE.match(entry["space"]) is not None and _is_int(entry.get("dim"), 1), path,
                 f"{where} is {entry!r:.120}, expected {{space: 'student:<fingerprint>' | "
                 "'teacher:<fingerprint>', dim: positive integer}")
    _require(("teacher_vec" in vectors) == (manifest.get("teacher") is not None), path,
             "vectors.teacher_vec must be present exactly when key 'teacher' is")
    ann = vectors.get("teacher_vec", {}).get("ann")
    if ann is not None:
        _require(isinstance(ann, dict) and _is_int(ann.get("dim"), 1) and ann["dim"] <= vectors["teacher_vec"]["dim"],
                 path, f"vectors.teacher_vec.ann is {ann!r:.80}, expected {{dim: 1..the teacher's dim}}")
    for i, shard in enumerate(manifest.get("shards") or []):
        if isinstance(shard, dict):
            _require(("teacher_faiss" in shard) == (ann is not None), path,
                     f"shards[{i}] {'lacks' if ann is not None else 'has'} a teacher_faiss, but vectors.teacher_vec."
                     f"ann is {'set' if ann is not None else 'not'}: every shard has a teacher ANN index, or none")
    projected = vectors.get("projected_vec")
    if projected is not None:
        _check_model(projected.get("teacher"), "vectors.projected_vec.teacher", path)
        _require(projected["space"] == f"teacher:{projected['teacher']['fingerprint']}", path,
                 "vectors.projected_vec.space must be 'teacher:' + its teacher's fingerprint")
        _require(projected["dim"] == projected["teacher"]["dim"], path,
                 "vectors.projected_vec.dim must equal its teacher's dim")
        sha = projected.get("projection_sha256")
        _require(isinstance(sha, str) and SHA256.match(sha) is not None, path,
                 f"vectors.projected_vec.projection_sha256 is {sha!r:.80}, expected 64 hex digits")


def _check_shard(shard: Any, i: int, path: Path) -> int:
    """Validate ``shards[i]``; returns its number (shard-NNNNN)."""
    where = f"shards[{i}]"
    _require(isinstance(shard, dict), path, f"{where} is {type(shard).__name__}, expected an object")
    missing = [k for k in SHARD_KEYS if k not in shard]
    _require(not missing, path, f"{where} lacks {', '.join(missing)}")
    name = shard["name"]
    _require(isinstance(name, str) and SHARD_NAME.match(name) is not None, path,
             f"{where}.name is {name!r:.80}, expected shard-NNNNN")
    # file names are derived, never free: no path in the manifest can leave the index directory
    for key in ("arrow", "faiss"):
        _require(shard[key] == f"{name}.{key}", path,
                 f"{where}.{key} is {shard[key]!r:.80}, expected {name}.{key} (a file inside the index directory)")
    _require(_is_int(shard["rows"]), path, f"{where}.rows is {shard['rows']!r:.80}, expected an integer >= 0")
    for key in ("arrow_sha256", "faiss_sha256"):
        _require(isinstance(shard[key], str) and SHA256.match(shard[key]) is not None, path,
                 f"{where}.{key} is {shard[key]!r:.80}, expected 64 hex digits")
    for key in ("arrow_bytes", "faiss_bytes"):
        _require(shard.get(key) is None or _is_int(shard[key]), path,
                 f"{where}.{key} is {shard.get(key)!r:.80}, expected an integer >= 0")
    _check_index_spec(shard["index"], f"{where}.index", path)
    if any(key in shard for key in TEACHER_ANN_KEYS):
        lacking = [k for k in TEACHER_ANN_KEYS if k not in shard]
        _require(not lacking, path, f"{where} lacks {', '.join(lacking)}")
        _require(shard["teacher_faiss"] == f"{name}.teacher.faiss", path,
                 f"{where}.teacher_faiss is {shard['teacher_faiss']!r:.80}, expected {name}.teacher.faiss")
        _require(isinstance(shard["teacher_faiss_sha256"], str) and SHA256.match(shard["teacher_faiss_sha256"]),
                 path, f"{where}.teacher_faiss_sha256 is {shard['teacher_faiss_sha256']!r:.80}, expected 64 hex digits")
        _require(_is_int(shard["teacher_faiss_bytes"]), path,
                 f"{where}.teacher_faiss_bytes is {shard['teacher_faiss_bytes']!r:.80}, expected an integer >= 0")
        _check_index_spec(shard["teacher_index"], f"{where}.teacher_index", path)
    retired = shard["retired"]
    _require(isinstance(retired, list) and all(isinstance(r, str) for r in retired), path,
             f"{where}.retired must be a list of row ids (strings)")
    _require(len(retired) <= shard["rows"], path, f"{where} retires {len(retired)} of {shard['rows']} rows")
    return int(name.split("-")[1])


def validate(manifest: Any, path: Path) -> dict[str, Any]:
    """Check ``manifest`` against the schema in this module's docstring; ``ManifestError`` names
    the first key at fault. Run on every open, so no reader ever trips over a malformed field."""
    _require(isinstance(manifest, dict), path, "expected a JSON object")
    _require(manifest.get("format") == FORMAT, path,
             f"key 'format' is {manifest.get('format')!r:.80}, expected {FORMAT!r}: not a vkd index manifest")
    version = manifest.get("version")
    _require(_is_int(version, 1), path, f"key 'version' is {version!r:.80}, expected an integer")
    _require(version <= VERSION, path,
             f"version {version} is newer than this vkd reads (up to {VERSION}); upgrade vkd")
    for key in ("images_root", "student", "shards"):
        _require(key in manifest, path, f"missing key {key!r}")
    _require(isinstance(manifest["images_root"], str) and manifest["images_root"] != "", path,
             f"key 'images_root' is {manifest['images_root']!r:.80}, expected the images folder's path")
    _check_model(manifest["student"], "student", path)
    if manifest.get("teacher") is not None:
        _check_model(manifest["teacher"], "teacher", path)
    for key in ("build", "unfinished_run"):
        _require(manifest.get(key) is None or isinstance(manifest[key], dict), path,
                 f"key {key!r} is {manifest.get(key)!r:.80}, expected an object")
    for key in ("rows", "live_rows", "skipped"):
        _require(manifest.get(key) is None or _is_int(manifest[key]), path,
                 f"key {key!r} is {manifest.get(key)!r:.80}, expected an integer >= 0")
    _check_vectors(manifest, path)
    _require(isinstance(manifest["shards"], list), path, "key 'shards' must be a list")
    numbers = [_check_shard(shard, i, path) for i, shard in enumerate(manifest["shards"])]
    _require(len(set(numbers)) == len(numbers), path, "a shard is listed twice")
    next_shard = manifest.get("next_shard", max(numbers, default=-1) + 1)
    _require(_is_int(next_shard) and next_shard > max(numbers, default=-1), path,
             f"key 'next_shard' is {next_shard!r:.80}, expected an integer above every listed shard's number")
    return manifest


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The committed manifest of ``index_dir``, validated."""
    path = Path(index_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest here; {index_dir} is not a vkd index "
                            "(create one with `vkd index IMAGES_DIR --model STUDENT --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ManifestError(f"{path}: cannot read: {type(error).__name__}: {error}") from None
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
        if "teacher_faiss" in shard:
            names.add(shard["teacher_faiss"])
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
    """The records of ``skipped.jsonl``; a line that is not one (bad bytes, bad JSON, wrong
    shape) is left out.

    The file is a record for people and a cache for us: a lost line only costs one retry of
    its file, so nothing in it may stop a run.
    """
    path = Path(index_dir) / SKIPPED_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError:
        return []  # unreadable: every skipped file is retried, and the next write replaces it
    records = []
    # split on b"\n" only: str.splitlines would also split inside a line at \x85 or U+2028
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            records.append(SkipRecord.from_json(json.loads(line.decode("utf-8"))))
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
    return records


def write_skipped(index_dir: Path, records: Iterable[SkipRecord]) -> int:
    """Replace ``skipped.jsonl``: one JSON object per line, ASCII only (``ensure_ascii``), so
    no name can break a line for any reader; see ``SkipRecord.to_json`` for the fields."""
    ordered = sorted(records, key=lambda r: r.path)
    data = "".join(json.dumps(r.to_json(), ensure_ascii=True) + "\n" for r in ordered).encode("ascii")
    atomic_write_bytes(Path(index_dir) / SKIPPED_NAME, data)
    return len(ordered)
