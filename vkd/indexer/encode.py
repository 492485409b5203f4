"""Stage 3 — vectors for a batch of decoded images, from the student and (optionally) the teacher.

``EncodeStage`` is a callable class so that Ray Data can hold the models in actors
(``ds.map_batches(EncodeStage, fn_constructor_kwargs=..., concurrency=...)``); the local
pipeline calls ``EncodeStage.encode`` directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from vkd.models.base import Encoder


PREFER = ("onnx", "torch")


def _cuda(device: Any) -> bool:
    """Whether the torch models would run on CUDA: ``device`` says so, or it is None and a
    GPU is there (as ``load_encoder`` decides). No torch installed means no CUDA."""
    if device is not None:
        return str(device).startswith("cuda")
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_prefer(prefer: str | None, device: Any = None) -> str:
    """The backend to ask ``load_encoder`` for: ``prefer`` as given, or by default ONNX on a
    CPU (an export there is several times faster than torch fp32 and within parity of it)
    and torch on CUDA (the export runs on the CPU only, and bf16 on a GPU is faster)."""
    if prefer is None:
        return "torch" if _cuda(device) else "onnx"
    if prefer not in PREFER:
        raise ValueError(f"prefer={prefer!r}: choose one of {', '.join(PREFER)} (or None: ONNX on a CPU when the "
                         "model has an export, torch on CUDA)")
    return prefer


def backend_label(encoder: Encoder) -> str:
    """How an encoder runs, for people reading a run summary: ``onnx int8``, ``torch float32 cpu``."""
    if getattr(encoder, "backend", None) == "onnx":
        return f"onnx {getattr(encoder, 'precision', '')}".strip()
    dtype = str(getattr(encoder, "dtype", "")).removeprefix("torch.")
    return " ".join(part for part in ("torch", dtype, str(getattr(encoder, "device", "") or "")) if part)


def as_encoder(model: str | os.PathLike[str] | Encoder, *, device: Any = None, batch_size: int = 32,
               options: Mapping[str, Any] | None = None, prefer: str | None = "torch",
               images: bool = False) -> Encoder:
    """An ``Encoder`` as is, or one loaded from a model directory / hub id with ``options``
    (``load_encoder`` keywords, e.g. ``document_instruction``; None values are left out).

    ``prefer``: "onnx" takes the model's ``<model>/onnx`` export when there is one made with
    these options, "torch" the torch model, None decides by the device (``resolve_prefer``).
    With ``images=True`` an export without an image tower (Qwen3-VL exports its text tower
    only) is not taken: the torch model encodes the images instead.
    """
    from vkd.models.base import Encoder

    if isinstance(model, Encoder):
        return model
    from vkd.models import load_encoder

    given = {key: value for key, value in (options or {}).items() if value is not None}
    chosen = resolve_prefer(prefer, device)
    encoder = load_encoder(model, device=device, batch_size=batch_size, prefer=chosen, **given)
    if images and getattr(encoder, "backend", None) == "onnx" and not getattr(encoder, "has_image_tower", True):
        encoder = load_encoder(model, device=device, batch_size=batch_size, prefer="torch", **given)
    return encoder


@dataclass
class Encoded:
    student: np.ndarray  # float32 [n_ok, d]
    teacher: np.ndarray | None  # float16 [n_ok, d_t]
    ok: list[int]  # positions in the input batch that were encoded
    failed: dict[int, str] = field(default_factory=dict)  # position -> reason


class EncodeStage:
    """Images are documents: each model encodes them with its document instruction (the
    query instruction is recorded with the index, for the queries of ``vkd search``).
    ``student_options``/``teacher_options`` are ``load_encoder`` options for models given by name.
    ``prefer`` picks each named model's backend (``as_encoder``; default: ONNX on a CPU when
    the model has an export with an image tower, torch on CUDA). The backend does not change
    what is stored: an export keeps its model's fingerprint, and its vectors are within the
    export's parity bound (cosine >= 0.99) of torch's."""

    def __init__(self, student: str | Encoder, teacher: str | Encoder | None = None, *,
                 batch_size: int = 32, device: Any = None, student_options: Mapping[str, Any] | None = None,
                 teacher_options: Mapping[str, Any] | None = None, prefer: str | None = None) -> None:
        self.student = as_encoder(student, device=device, batch_size=batch_size, options=student_options,
                                  prefer=prefer, images=True)
        self.teacher = (as_encoder(teacher, device=device, batch_size=batch_size, options=teacher_options,
                                   prefer=prefer, images=True)
                        if teacher is not None else None)
        self.batch_size = batch_size

    def _vectors(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        student = self.student.encode_images(list(images), batch_size=self.batch_size)
        teacher = None
        if self.teacher is not None:
            teacher = self.teacher.encode_images(list(images), batch_size=self.batch_size).astype(np.float16)
        return student, teacher

    def encode(self, images: Sequence[Image.Image]) -> Encoded:
        """Encode a batch; if the batch fails, find the images that fail on their own.

        An image the decoder accepted can still break a model's preprocessing; it is
        reported, not fatal. When every image fails alone too, the model is at fault and
        the original error is raised.
        """
        try:
            student, teacher = self._vectors(images)
            return Encoded(student, teacher, list(range(len(images))))
        except Exception as batch_error:
            if len(images) <= 1:
                raise
            parts_s, parts_t, ok, failed = [], [], [], {}
            for position, image in enumerate(images):
                try:
                    student, teacher = self._vectors([image])
                except Exception as error:
                    failed[position] = f"encoder failed: {type(error).__name__}: {error}"
                    continue
                parts_s.append(student)
                parts_t.append(teacher)
                ok.append(position)
            if not ok:
                raise batch_error
            teacher_all = np.concatenate(parts_t) if self.teacher is not None else None
            return Encoded(np.concatenate(parts_s), teacher_all, ok, failed)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """The encode stage over a column batch from ``decode_batch``: rows that failed to decode
        or encode are dropped (their ``error`` kept out of the result), ``image`` is replaced by
        ``student_vec`` (and ``teacher_vec``)."""
        keep = [i for i, error in enumerate(batch["error"]) if error is None]
        encoded = self.encode([batch["image"][i] for i in keep])
        rows = [keep[i] for i in encoded.ok]
        out = {key: [batch[key][i] for i in rows] for key in batch if key not in ("image", "error")}
        out["student_vec"] = encoded.student
        if encoded.teacher is not None:
            out["teacher_vec"] = encoded.teacher
        return out
