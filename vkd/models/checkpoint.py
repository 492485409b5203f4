"""Checkpoint files: where a model's weights live, what they hash to, and whether they are
safe to open.

An encoder's fingerprint identifies its weights by the checkpoint's weight files, not by
the tensors in memory: the same files loaded in bf16 on a GPU, in fp32 on a CPU or
exported to ONNX are one model, and reading a few cached hashes costs nothing where
hashing an 8B model's tensors meant a pass over 16 GB at every load. Each file's sha256
is cached by (real path, size, mtime_ns) in ``$VKD_HOME/file-hashes.json``; a file that
changes gets a new mtime and so a new hash.

Importing this module pulls in the standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vkd.paths import vkd_home

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
HASH_CACHE_FILE = "file-hashes.json"
HASH_CACHE_FORMAT = 1
_CHUNK = 16 * 1024 * 1024
# The hub cache stores each large (LFS) file as blobs/<sha256 of its content>.
_HUB_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


# -- names ---------------------------------------------------------------------------------


def resolve_model_name(name_or_path: str | os.PathLike[str]) -> str:
    """A local directory as its absolute resolved path, a hub id unchanged.

    Indexes and exports record this name, so it must open the same model from any working
    directory; a relative path would be retried as a hub id elsewhere.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    return str(name_or_path)


def hub_snapshot_dir(name: str) -> Path | None:
    """The local snapshot directory of hub id ``name`` (the revision transformers loads),
    found in the hub cache without touching the network; None when it is not cached."""
    try:
        from transformers.utils import cached_file

        config = cached_file(name, "config.json", local_files_only=True,
                             _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # not cached, or not a valid repo id
        return None
    return Path(config).parent if config else None


# -- which files hold the weights ------------------------------------------------------------


def _listed(directory: Path, single: str, index: str) -> list[Path]:
    index_path = directory / index
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not a valid weights index ({error})") from error
        return [directory / name for name in sorted(set(weight_map.values()))]
    return [directory / single] if (directory / single).is_file() else []


def has_safetensors(directory: str | os.PathLike[str]) -> bool:
    directory = Path(directory)
    return (directory / SAFE_WEIGHTS).is_file() or (directory / SAFE_WEIGHTS_INDEX).is_file()


def has_pickle_weights(directory: str | os.PathLike[str]) -> bool:
    directory = Path(directory)
    return (directory / PICKLE_WEIGHTS).is_file() or (directory / PICKLE_WEIGHTS_INDEX).is_file()


def weight_files(directory: str | os.PathLike[str], *, allow_pickle: bool = False) -> list[Path]:
    """The files transformers loads ``directory``'s weights from, sorted by name: the
    safetensors (single or sharded), else with ``allow_pickle`` the pytorch_model*.bin."""
    directory = Path(directory)
    files = _listed(directory, SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX)
    if not files and allow_pickle:
        files = _listed(directory, PICKLE_WEIGHTS, PICKLE_WEIGHTS_INDEX)
    return files


def check_weights_format(directory: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
    """Refuse a model directory whose weights exist only as pickle, unless allowed."""
    if allow_pickle or not Path(directory).is_dir():
        return
    if has_pickle_weights(directory) and not has_safetensors(directory):
        raise ValueError(
            f"{directory}: the weights are only in pickle format ({PICKLE_WEIGHTS}), and unpickling can run "
            "arbitrary code. Convert them to safetensors once (load_encoder(DIR, allow_pickle=True).save(NEW_DIR) "
            "writes model.safetensors), or pass allow_pickle=True if you trust where they came from."
        )


def checkpoint_weights(name: str, *, allow_pickle: bool = False) -> tuple[Path, list[Path]] | None:
    """(directory, weight files) that a model named ``name`` was loaded from: the local
    directory, or a hub id's snapshot in the hub cache; None when there are none to find."""
    directory = Path(name) if Path(name).is_dir() else hub_snapshot_dir(name)
    if directory is None:
        return None
    files = weight_files(directory, allow_pickle=allow_pickle)
    return (directory, files) if files else None


# -- hashing -------------------------------------------------------------------------------


def hash_cache_path() -> Path:
    return vkd_home() / HASH_CACHE_FILE


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    # A missing, unreadable or corrupt cache only costs a re-hash, never an error.
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != HASH_CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {key: value for key, value in data["files"].items() if isinstance(value, dict)}


def _write_cache(path: Path, files: dict[str, dict[str, Any]]) -> None:
    # Entries of files that are gone would otherwise pile up (every test run adds some).
    live = {key: value for key, value in files.items() if os.path.exists(key)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"format": HASH_CACHE_FORMAT, "files": live}, handle, indent=1, sort_keys=True)
            # Atomic: a concurrent reader sees the old cache or the new one, never half of one.
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        pass  # read-only home: hashes are recomputed next time, which is only slower


def file_hashes(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """sha256 of each file, from the cache when (real path, size, mtime_ns) match.

    A hub-cache blob is named by its sha256 already, so it is never read.
    """
    cache_path = hash_cache_path()
    cache = _read_cache(cache_path)
    changed = False
    hashes = []
    for path in paths:
        real = os.path.realpath(path)
        stat = os.stat(real)
        entry = cache.get(real)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            hashes.append(str(entry["sha256"]))
            continue
        name = os.path.basename(real)
        if os.path.basename(os.path.dirname(real)) == "blobs" and _HUB_BLOB_NAME.fullmatch(name):
            sha = name
        else:
            sha = sha256_file(real)
        cache[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
        changed = True
        hashes.append(sha)
    if changed:
        _write_cache(cache_path, cache)
    return hashes


def files_digest(directory: str | os.PathLike[str], files: Iterable[Path]) -> str:
    """sha256 over (name relative to ``directory``, content sha256) of ``files`` by name."""
    directory = Path(directory)
    ordered = sorted(files, key=lambda p: p.relative_to(directory).as_posix())
    digest = hashlib.sha256()
    for path, sha in zip(ordered, file_hashes(ordered), strict=True):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{sha}\n".encode())
    return digest.hexdigest()
