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


def as_encoder(model: str | os.PathLike[str] | Encoder, *, device: Any = None, batch_size: int = 32,
               options: Mapping[str, Any] | None = None) -> Encoder:
    """An ``Encoder`` as is, or one loaded from a model directory / hub id with ``options``
    (``load_encoder`` keywords, e.g. ``document_instruction``; None values are left out)."""
    from vkd.models.base import Encoder

    if isinstance(model, Encoder):
        return model
    from vkd.models import load_encoder

    given = {key: value for key, value in (options or {}).items() if value is not None}
    return load_encoder(model, device=device, batch_size=batch_size, **given)


@dataclass
class Encoded:
    student: np.ndarray  # float32 [n_ok, d]
    teacher: np.ndarray | None  # float16 [n_ok, d_t]
    ok: list[int]  # positions in the input batch that were encoded
    failed: dict[int, str] = field(default_factory=dict)  # position -> reason


class EncodeStage:
    """Images are documents: each model encodes them with its document instruction (the
    query instruction is recorded with the index, for the queries of ``vkd search``).
    ``student_options``/``teacher_options`` are ``load_encoder`` options for models given by name."""

    def __init__(self, student: str | Encoder, teacher: str | Encoder | None = None, *,
                 batch_size: int = 32, device: Any = None, student_options: Mapping[str, Any] | None = None,
                 teacher_options: Mapping[str, Any] | None = None) -> None:
        self.student = as_encoder(student, device=device, batch_size=batch_size, options=student_options)
        self.teacher = (as_encoder(teacher, device=device, batch_size=batch_size, options=teacher_options)
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
