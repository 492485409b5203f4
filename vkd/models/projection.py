"""The student's learned projection into a teacher's space, carried by the model directory.

Distillation for an asymmetric search mode (``train_modes`` in the config) learns one linear
map ``W`` [d_teacher, d_student] that takes the student's normalised text *and* image vectors
into the teacher's space (``vkd.distill.losses.TeacherProjections``). ``vkd distill`` writes it
next to the merged weights::

    model/
      vkd_projection.json          {"format", "student_dim", "dim", "teacher": {name, fingerprint, dim,
                                    family, options}, "modes": [...], "sha256": of the weights file}
      vkd_projection.safetensors   "weight": float32 [dim, student_dim]

``load_encoder(DIR, space="teacher")`` (or ``"teacher:<fingerprint>"``, which also checks that
the projection is into that teacher's space) returns a ``ProjectedEncoder``: the student's vector
times ``Wᵀ``, normalised again. The weights file is not one transformers loads (not
``model.safetensors``), so the student's own fingerprint is unchanged; the projected encoder's
fingerprint adds the projection's digest.

Only numpy and safetensors are needed here: the ONNX backend (no torch) projects the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vkd.models.base import Encoder, l2_normalize

PROJECTION_JSON = "vkd_projection.json"
PROJECTION_WEIGHTS = "vkd_projection.safetensors"
PROJECTION_FORMAT = "vkd-projection/1"
#: the search modes a projection can be trained for (two-stage needs none)
ASYMMETRIC_MODES = ("student-query", "student-index")
STUDENT_SPACE = "student"


class ProjectionError(ValueError):
    """A model has no projection, or not one into the space asked for."""


@dataclass(frozen=True)
class Projection:
    """``weight`` float32 [dim, student_dim]; ``teacher`` the manifest-style record of the teacher
    whose space it maps into."""

    weight: np.ndarray
    teacher: dict[str, Any]
    modes: tuple[str, ...] = ()
    sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def student_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def space(self) -> str:
        return f"teacher:{self.teacher['fingerprint']}"

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """normalise(vectors @ Wᵀ): float32 [n, dim] from normalised student vectors [n, student_dim]."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.student_dim:
            raise ValueError(f"projection takes [n, {self.student_dim}] student vectors; got shape {vectors.shape}")
        return l2_normalize(vectors @ self.weight.T)


def write_projection(model_dir: str | os.PathLike[str], weight: np.ndarray, teacher: dict[str, Any],
                     modes: Sequence[str]) -> Path:
    """Write the projection files into ``model_dir``; returns the JSON file's path."""
    from safetensors.numpy import save_file

    directory = Path(model_dir)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    weights_path = directory / PROJECTION_WEIGHTS
    save_file({"weight": weight}, str(weights_path))
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    keys = ("name", "fingerprint", "dim", "family", "options")
    record = {
        "format": PROJECTION_FORMAT,
        "student_dim": int(weight.shape[1]),
        "dim": int(weight.shape[0]),
        "teacher": {key: teacher.get(key) for key in keys if key in teacher},
        "modes": [m for m in modes if m in ASYMMETRIC_MODES],
        "sha256": digest,
    }
    path = directory / PROJECTION_JSON
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_projection(model_dir: str | os.PathLike[str]) -> Projection | None:
    """The projection a model directory carries; None when it carries none (a hub id, an ONNX
    export directory's parent without one, any model not distilled for an asymmetric mode)."""
    directory = Path(model_dir)
    if directory.name == "onnx" and not (directory / PROJECTION_JSON).is_file():
        directory = directory.parent  # an ONNX export inside the model directory: the model's projection
    path = directory / PROJECTION_JSON
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        record = json.loads(path.read_text())
        data = (directory / PROJECTION_WEIGHTS).read_bytes()
    except (OSError, json.JSONDecodeError) as error:
        raise ProjectionError(f"{path}: cannot read the projection ({error})") from None
    if not isinstance(record, dict) or record.get("format") != PROJECTION_FORMAT or not isinstance(
            record.get("teacher"), dict) or not record["teacher"].get("fingerprint"):
        raise ProjectionError(f"{path}: not a {PROJECTION_FORMAT} file (format, teacher.fingerprint expected)")
    digest = hashlib.sha256(data).hexdigest()
    if record.get("sha256") and record["sha256"] != digest:
        raise ProjectionError(f"{directory / PROJECTION_WEIGHTS}: its sha256 is not the one {path.name} records "
                              "(the file was replaced or damaged); distil again")
    weight = load_file(str(directory / PROJECTION_WEIGHTS)).get("weight")
    if weight is None or weight.ndim != 2 or weight.shape != (record.get("dim"), record.get("student_dim")):
        raise ProjectionError(f"{directory / PROJECTION_WEIGHTS}: expected a 'weight' of shape "
                              f"[{record.get('dim')}, {record.get('student_dim')}]")
    return Projection(np.asarray(weight, dtype=np.float32), dict(record["teacher"]),
                      tuple(record.get("modes") or ()), digest, record)


def check_space(space: str) -> str:
    """``space`` as given, when it is one ``load_encoder`` understands."""
    if space == STUDENT_SPACE or space == "teacher" or (space.startswith("teacher:") and len(space) > 8):
        return space
    raise ValueError(f"space={space!r}: expected 'student', 'teacher' or 'teacher:<teacher fingerprint>'")


def projection_for(model_dir: str | os.PathLike[str], space: str) -> Projection:
    """The projection of ``model_dir`` into ``space`` ("teacher" or "teacher:<fingerprint>");
    ``ProjectionError`` saying what to run when there is none, or one into another space."""
    check_space(space)
    projection = read_projection(model_dir)
    if projection is None:
        raise ProjectionError(
            f"{model_dir}: this student carries no projection into a teacher's space ({PROJECTION_JSON}); "
            "distil it with `train_modes: [student-query, student-index]` in the config "
            "(`vkd distill CONFIG train_modes=[student-query]`) and use the model/ directory it writes")
    wanted = space.split(":", 1)[1] if ":" in space else None
    if wanted is not None and wanted != projection.teacher["fingerprint"]:
        raise ProjectionError(
            f"{model_dir}: its projection maps into the space of teacher {projection.teacher.get('name')} "
            f"(fingerprint {projection.teacher['fingerprint']}), not of teacher fingerprint {wanted}; distil "
            "this student against that teacher")
    return projection


class ProjectedEncoder(Encoder):
    """A student encoder whose vectors are projected into a teacher's space."""

    def __init__(self, base: Encoder, projection: Projection) -> None:
        if int(base.dim) != projection.student_dim:
            raise ProjectionError(f"{base.name}: gives {base.dim}-d vectors but its projection takes "
                                  f"{projection.student_dim}-d ones (the projection belongs to another model)")
        self.base = base
        self.projection = projection
        self.name = base.name
        self.family = base.family
        self.dim = projection.dim
        self.batch_size = base.batch_size
        self.logit_scale = base.logit_scale
        self.query_instruction = base.query_instruction
        self.document_instruction = base.document_instruction
        self.thread_safe = getattr(base, "thread_safe", False)
        digest = hashlib.sha256(f"{base.fingerprint}|{projection.sha256}".encode())
        self._fingerprint = digest.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def space(self) -> str:
        return self.projection.space

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.projection.apply(self.base.encode_text(list(texts), batch_size=len(texts)))

    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray:
        return self.projection.apply(self.base.encode_images(list(images), batch_size=len(images)))

    def load_options(self) -> dict[str, Any]:
        return {**self.base.load_options(), "space": self.space}

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "dim": self.dim, "fingerprint": self.fingerprint,
                "options": self.load_options(), "student_fingerprint": self.base.fingerprint,
                "space": self.space}

    def __getattr__(self, name: str) -> Any:
        # backend details (device, backend, precision ...) are the base encoder's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)
