"""``OnnxEncoder``: the exported student run by ONNX Runtime, with no torch at run time.

An export directory (``vkd export``) holds ``text.onnx`` / ``image.onnx`` (fp32), their
``*.int8.onnx`` twins, the ``tokenizer.json`` and ``preprocessor_config.json`` the torch
model used, and ``export.json`` (the manifest read here). The encoder reports the torch
model's fingerprint (which names the checkpoint's files, so torch in fp32 or bf16 reports
the same one): the export's parity check is what makes vectors from either backend
interchangeable, so an index built with torch is searchable with ONNX and back.

Importing this module pulls in numpy, PIL, ``tokenizers`` and ``onnxruntime`` only.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vkd.export.preprocess import ImagePreprocessor, TextTokenizer
from vkd.models.base import Encoder

EXPORT_MANIFEST = "export.json"
EXPORT_FORMAT = 1
PRECISIONS = ("fp32", "int8")


def read_export_manifest(onnx_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``export.json`` of an export directory, with a clear error when absent."""
    path = Path(onnx_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX export here; run `vkd export MODEL_DIR` to write one")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); re-run `vkd export`") from error
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r}; this vkd reads format {EXPORT_FORMAT}. Re-run `vkd export`"
        )
    return manifest


class OnnxEncoder(Encoder):
    """An ``Encoder`` over an ONNX export directory.

    ``precision`` picks ``*.int8.onnx`` or the fp32 files; the default is INT8 when the
    export has it. ``threads`` sets ONNX Runtime's intra-op threads (default: its own).
    Sessions open lazily per tower, so a text-only search never loads the image tower.
    """

    backend = "onnx"
    #: ONNX Runtime sessions and the configured tokenizer may be called from many threads.
    thread_safe = True

    def __init__(
        self,
        onnx_dir: str | os.PathLike[str],
        *,
        batch_size: int = 32,
        precision: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        # Resolved so that ``name``, which indexes record, opens from any working directory.
        self.dir = Path(onnx_dir).expanduser().resolve()
        self.manifest = read_export_manifest(self.dir)
        source = self.manifest["source"]
        # The name is what load_encoder(..., prefer="onnx") opens: the model directory the
        # export sits in, or the export directory itself when it was written elsewhere.
        self.name = str(self.dir.parent) if self.dir.name == "onnx" else str(self.dir)
        self.family = str(source["family"])
        self.dim = int(source["dim"])
        self.logit_scale = float(source.get("logit_scale", 20.0))
        self.batch_size = batch_size
        self.threads = threads
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        towers = [self.manifest[tower] for tower in ("text", "image") if self.manifest.get(tower)]
        has_int8 = all(tower.get("int8") for tower in towers)
        if precision is None:
            precision = "int8" if has_int8 else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision == "int8" and not has_int8:
            raise ValueError(
                f"{self.dir}: this export has no INT8 models (exported with --int8 none); use precision='fp32' "
                "or re-export with --int8 dynamic"
            )
        self.precision = precision
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tokenizer: TextTokenizer | None = None
        self._image_preprocessor: ImagePreprocessor | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["source"]["fingerprint"])

    def load_options(self) -> dict[str, Any]:
        """The options the exported model was loaded with (empty for exports older than the record)."""
        return dict(self.manifest["source"].get("options") or {})

    @property
    def query_instruction(self) -> str | None:  # type: ignore[override]
        return self.load_options().get("query_instruction")

    @property
    def document_instruction(self) -> str | None:  # type: ignore[override]
        return self.load_options().get("document_instruction")

    @property
    def has_image_tower(self) -> bool:
        return bool(self.manifest.get("image"))

    def model_path(self, tower: str) -> Path:
        spec = self.manifest.get(tower)
        if not spec:
            reason = self.manifest.get("image_unsupported") or "it was not exported"
            raise ValueError(
                f"{self.dir}: this ONNX export has no {tower} tower ({reason}); encode {tower}s with the torch "
                f"model instead (load_encoder({self.name!r}, prefer='torch'); CLI: --prefer torch)"
            )
        return self.dir / spec[self.precision]

    def _session(self, tower: str) -> Any:
        session = self._sessions.get(tower)
        if session is None:
            with self._lock:
                session = self._sessions.get(tower)
                if session is None:
                    import onnxruntime as ort

                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    if self.threads:
                        options.intra_op_num_threads = int(self.threads)
                    session = ort.InferenceSession(
                        str(self.model_path(tower)), sess_options=options, providers=self.providers
                    )
                    self._sessions[tower] = session
        return session

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            spec = self.manifest["text"]
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = TextTokenizer(self.dir / spec["tokenizer"], spec)
        return self._tokenizer

    @property
    def image_preprocessor(self) -> ImagePreprocessor:
        if self._image_preprocessor is None:
            self.model_path("image")  # the clear error when there is no image tower
            with self._lock:
                if self._image_preprocessor is None:
                    self._image_preprocessor = ImagePreprocessor.from_file(
                        self.dir / self.manifest["image"]["preprocessor"]
                    )
        return self._image_preprocessor

    def text_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The text tower's feeds for ``texts`` (also what static calibration uses)."""
        return self.tokenizer(list(texts))

    def image_inputs(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        return {"pixel_values": self.image_preprocessor(list(images))}

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        session = self._session("text")
        return session.run(None, self.text_inputs(texts))[0]

    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray:
        feeds = self.image_inputs(images)
        return self._session("image").run(None, feeds)[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "onnx", "precision": self.precision, "dir": str(self.dir)}

    def __repr__(self) -> str:
        return (f"OnnxEncoder(dir={str(self.dir)!r}, family={self.family!r}, dim={self.dim}, "
                f"precision={self.precision!r})")
