"""``model_info``: what a model directory is, read from its files without loading it.

Family, embedding size, towers, parameter count (summed from the safetensors headers, so an
8B model costs a few kB of reading), size on disk, whether the weights are random
(``vkd.json``), the encoder options saved with it and its ONNX export. ``vkd model info``
prints it.

Importing this module pulls in the standard library only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from vkd.models.provenance import read_provenance, weights_note


def safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes): its first bytes."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:  # the header of an 8B checkpoint is ~100 kB
            raise ValueError(f"{path}: header of {length} bytes; not a safetensors file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors header")
    return header


def weights_summary(directory: Path) -> dict[str, Any]:
    """Parameters, dtypes and bytes of the safetensors weights in ``directory`` (tied weights
    are stored, and so counted, once); ``parameters`` None without safetensors."""
    from vkd.models.checkpoint import weight_files

    files = weight_files(directory)
    if not files:
        return {"files": [], "parameters": None, "dtypes": [], "bytes": 0}
    parameters, dtypes = 0, set()
    for path in files:
        for name, entry in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            parameters += math.prod(entry["shape"])
            dtypes.add(entry["dtype"])
    return {"files": [path.name for path in files], "parameters": parameters, "dtypes": sorted(dtypes),
            "bytes": sum(path.stat().st_size for path in files)}


def _folder_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())


def _towers(config: dict[str, Any], backend: str) -> dict[str, Any]:
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    towers = {"text": {"layers": text.get("num_hidden_layers"), "hidden_size": text.get("hidden_size"),
                       "vocab_size": text.get("vocab_size"), "positions": text.get("max_position_embeddings")}}
    if backend == "qwen3-vl":
        towers["vision"] = {"layers": vision.get("depth"), "hidden_size": vision.get("hidden_size"),
                            "patch_size": vision.get("patch_size"), "merge_size": vision.get("spatial_merge_size")}
    else:
        towers["vision"] = {"layers": vision.get("num_hidden_layers"), "hidden_size": vision.get("hidden_size"),
                            "image_size": vision.get("image_size"), "patch_size": vision.get("patch_size")}
    return towers


def _options(directory: Path, config: dict[str, Any], backend: str) -> dict[str, Any]:
    """The encoder options this directory opens with (what ``load_encoder`` applies unless told)."""
    if backend == "qwen3-vl":
        from vkd.models.qwen3vl import OPTIONS_FILE

        path = directory / OPTIONS_FILE
        try:
            saved = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError as error:
            return {"error": f"{path}: not valid JSON ({error})"}
        return saved if isinstance(saved, dict) else {"error": f"{path}: not a JSON object"}
    text = config.get("text_config") or config
    positions = text.get("max_position_embeddings")
    return {"max_text_length": positions} if positions else {}


def _onnx(directory: Path) -> dict[str, Any] | None:
    manifest = directory / "onnx" / "export.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return {"dir": str(manifest.parent), "error": "export.json is not valid JSON"}
    towers = [tower for tower in ("text", "image") if isinstance(data.get(tower), dict)]
    return {"dir": str(manifest.parent), "towers": towers, "bytes": _folder_bytes(manifest.parent),
            **({"precisions": data["precisions"]} if "precisions" in data else {})}


def resolve_directory(name_or_path: str | os.PathLike[str]) -> Path:
    """A local model directory, or a hub id's snapshot in the local hub cache (never downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{path}: a file, not a model directory")
    from vkd.models.checkpoint import hub_snapshot_dir

    snapshot = hub_snapshot_dir(str(name_or_path))
    if snapshot is None:
        raise ValueError(f"{name_or_path}: no such model directory, and no hub model of that id in the local "
                         "hub cache (nothing is downloaded to describe it)")
    return snapshot


def model_info(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``name_or_path`` is (see the module docstring), as a JSON-ready dict."""
    from vkd.models.registry import SUPPORTED_FAMILIES

    directory = resolve_directory(name_or_path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no config.json; not a model directory (save_pretrained, `vkd distill`, "
                         "`vkd model tiny` or `vkd model random` write one)")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type", "")
    backend = SUPPORTED_FAMILIES.get(model_type, "unsupported")
    text = config.get("text_config") or config
    options = _options(directory, config, backend)
    if backend == "qwen3-vl":
        dim = options.get("matryoshka_dim") or text.get("hidden_size")
    else:
        dim = config.get("projection_dim") or text.get("projection_size") or text.get("hidden_size")
    weights = weights_summary(directory)
    info: dict[str, Any] = {
        "name": str(directory),
        "family": model_type,
        "backend": backend,
        "architecture": (config.get("architectures") or [None])[0],
        "dim": dim,
        "towers": _towers(config, backend),
        "parameters": weights["parameters"],
        "dtypes": weights["dtypes"],
        "weight_files": weights["files"],
        "weights_bytes": weights["bytes"],
        "size_on_disk_bytes": _folder_bytes(directory),
        "options": options,
        "onnx": _onnx(directory),
    }
    try:
        record = read_provenance(directory)
    except ValueError as error:
        info.update(random=None, weights=f"unknown: {error}")
        return info
    note = weights_note(record)
    info["random"] = bool(note)
    info["weights"] = note or "not marked random (no vkd.json saying so): trained weights, as far as vkd knows"
    if record:
        info["provenance"] = record
    return info
