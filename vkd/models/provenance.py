"""How a model directory's weights were made, recorded next to them in ``vkd.json``.

The builders of random models (``vkd model tiny``, ``vkd model random``) write it, so that
nobody mistakes such a directory for a trained model: ``Encoder.describe()`` and ``vkd model
info`` read it back. It is one file for every family (the Qwen3-VL encoder options keep
their own file, ``vkd_qwen3vl.json``: those say how to encode, this says what the weights
are). A directory without it is whatever its files are; vkd claims nothing about it.

Importing this module pulls in the standard library only: ``vkd model --help`` and the
ONNX runtime read it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "vkd.json"
PROVENANCE_FORMAT = 1


def write_provenance(directory: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` (with ``format`` added) as ``directory/vkd.json``."""
    path = Path(directory) / PROVENANCE_FILE
    path.write_text(json.dumps({"format": PROVENANCE_FORMAT, **record}, indent=2) + "\n")
    return path


def read_provenance(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``vkd.json`` of a model directory; None when there is none (a hub id, a
    trained model). A file that is not a JSON object is an error that names it."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error}); it records how the weights were made, "
                         "and can be deleted if they are not random") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def _layers_phrase(record: dict[str, Any]) -> str:
    layers, full = record.get("layers") or {}, record.get("full_layers") or {}
    cut = [f"{layers[part]} of {full[part]} {part} layers" for part in ("text", "vision")
           if part in layers and part in full and layers[part] != full[part]]
    return f", truncated to {' and '.join(cut)}" if cut else ""


def weights_note(record: dict[str, Any] | None) -> str | None:
    """One line saying what the weights are, e.g. "random weights: arch clip-vit-b32, not a
    trained model"; None when the record does not say they are random."""
    if not record or not record.get("random"):
        return None
    return f"random weights: arch {record.get('arch', 'unknown')}{_layers_phrase(record)}, not a trained model"


def provenance_summary(name: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``describe()`` adds for the model directory ``name``: ``weights`` (the note) and
    ``random`` (the record) when its weights are random; nothing otherwise. Never raises:
    describing a model must not fail over this file (``vkd model info`` reports it instead)."""
    try:
        record = read_provenance(name) if Path(name).is_dir() else None
    except (OSError, ValueError):
        return {}
    note = weights_note(record)
    return {"weights": note, "random": record} if note and record else {}
