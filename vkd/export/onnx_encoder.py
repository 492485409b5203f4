"""``OnnxEncoder``: the exported student run by ONNX Runtime, with no torch at run time.

An export directory (``vkd export``) holds ``text.onnx`` / ``image.onnx`` (fp32), their
``*.int8.onnx`` twins, the ``tokenizer.json`` and ``preprocessor_config.json`` the torch
model used, and ``export.json`` (the manifest read here). A Qwen3-VL export's image side is
instead one graph per image bucket (``image-448x448.onnx`` ...; ``"kind": "buckets"`` in the
manifest): each image is resized to the bucket nearest its aspect ratio and a batch runs
as one call per bucket it touches. The encoder reports the torch
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

from vkd.export.preprocess import BucketImagePreprocessor, ImagePreprocessor, TextTokenizer
from vkd.models.base import Encoder
from vkd.models.image_buckets import Bucket, format_bucket

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
        has_int8 = all(spec.get("int8") for spec in self._graph_specs().values())
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
        self._image_preprocessor: ImagePreprocessor | BucketImagePreprocessor | None = None

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

    @property
    def image_buckets(self) -> tuple[Bucket, ...] | None:
        """The image buckets of a bucketed (Qwen3-VL) export, None for a single image graph."""
        spec = self.manifest.get("image") or {}
        if spec.get("kind") != "buckets":
            return None
        return tuple((int(entry["width"]), int(entry["height"])) for entry in spec["buckets"])

    def _graph_specs(self) -> dict[str, dict[str, Any]]:
        """{graph key: its manifest entry (with "fp32"/"int8" file names)}: "text", "image" or,
        for a bucketed image side, "image:WxH" per bucket."""
        graphs: dict[str, dict[str, Any]] = {}
        for tower in ("text", "image"):
            spec = self.manifest.get(tower)
            if not spec:
                continue
            if spec.get("kind") == "buckets":
                graphs.update({f"image:{entry['size']}": entry for entry in spec["buckets"]})
            else:
                graphs[tower] = spec
        return graphs

    def model_path(self, tower: str, bucket: Bucket | None = None) -> Path:
        """The ONNX file of ``tower`` at this encoder's precision; a bucketed image side needs
        ``bucket`` (default: the first)."""
        spec = self.manifest.get(tower)
        if not spec:
            reason = self.manifest.get("image_unsupported") or "it was not exported"
            raise ValueError(
                f"{self.dir}: this ONNX export has no {tower} tower ({reason}); encode {tower}s with the torch "
                f"model instead (load_encoder({self.name!r}, prefer='torch'); CLI: --prefer torch)"
            )
        key = tower
        if spec.get("kind") == "buckets":
            buckets = self.image_buckets or ()
            chosen = bucket or buckets[0]
            if chosen not in buckets:
                raise ValueError(f"{self.dir}: no image bucket {format_bucket(chosen)}; the export has "
                                 f"{', '.join(format_bucket(b) for b in buckets)}")
            key = f"image:{format_bucket(chosen)}"
        return self.dir / self._graph_specs()[key][self.precision]

    def model_files(self) -> list[Path]:
        """Every ONNX file this encoder runs at its precision (bucketed exports: one per bucket)."""
        return [self.dir / spec[self.precision] for spec in self._graph_specs().values()]

    def _session(self, tower: str, bucket: Bucket | None = None) -> Any:
        key = tower if bucket is None else f"{tower}:{format_bucket(bucket)}"
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    import onnxruntime as ort

                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    if self.threads:
                        options.intra_op_num_threads = int(self.threads)
                    session = ort.InferenceSession(
                        str(self.model_path(tower, bucket)), sess_options=options, providers=self.providers
                    )
                    self._sessions[key] = session
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
    def image_preprocessor(self) -> ImagePreprocessor | BucketImagePreprocessor:
        if self._image_preprocessor is None:
            self.model_path("image")  # the clear error when there is no image tower
            spec = self.manifest["image"]
            with self._lock:
                if self._image_preprocessor is None:
                    if spec.get("kind") == "buckets":
                        self._image_preprocessor = BucketImagePreprocessor(
                            {**spec["preprocess"], "buckets": [entry["size"] for entry in spec["buckets"]]},
                            source=str(self.dir / EXPORT_MANIFEST),
                        )
                    else:
                        self._image_preprocessor = ImagePreprocessor.from_file(self.dir / spec["preprocessor"])
        return self._image_preprocessor

    def text_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The text tower's feeds for ``texts`` (also what static calibration uses)."""
        return self.tokenizer(list(texts))

    def image_inputs(self, images: Sequence[Any], bucket: Bucket | None = None) -> dict[str, np.ndarray]:
        """The image graph's feeds; for a bucketed export every image is resized to ``bucket``
        (static calibration feeds each bucket's graph all calibration images this way)."""
        preprocessor = self.image_preprocessor
        if isinstance(preprocessor, BucketImagePreprocessor):
            if bucket is None:
                raise ValueError(f"{self.dir}: a bucketed image side takes one bucket per call; pass bucket=")
            return {"pixel_values": np.stack([preprocessor.one(image, bucket) for image in images])}
        return {"pixel_values": preprocessor(list(images))}

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        session = self._session("text")
        return session.run(None, self.text_inputs(texts))[0]

    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray:
        preprocessor = self.image_preprocessor
        if not isinstance(preprocessor, BucketImagePreprocessor):
            return self._session("image").run(None, self.image_inputs(images))[0]
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for bucket, (rows, pixels) in preprocessor.group(images).items():
            out[rows] = self._session("image", bucket).run(None, {"pixel_values": pixels})[0]
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "onnx", "precision": self.precision, "dir": str(self.dir)}

    def __repr__(self) -> str:
        return (f"OnnxEncoder(dir={str(self.dir)!r}, family={self.family!r}, dim={self.dim}, "
                f"precision={self.precision!r})")
