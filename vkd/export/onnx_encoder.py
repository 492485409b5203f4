"""``OnnxEncoder``: the exported student run by ONNX Runtime, with no torch at run time.

An export directory (``vkd export``) holds ``text.onnx`` / ``image.onnx`` (fp32), their
``*.int8.onnx`` twins, the ``tokenizer.json`` and ``preprocessor_config.json`` the torch
model used, and ``export.json`` (the manifest read here). A Qwen3-VL export's image side is
instead one graph per image bucket (``image-448x448.onnx`` ...; ``"kind": "buckets"`` in the
manifest): each image is resized to the bucket nearest its aspect ratio and a batch runs
as one call per bucket it touches, followed by the language model graph all buckets share
(``image-language-model.onnx``, the manifest's ``"language_model"``), fed the bucket graph's
outputs by name. A graph over the protobuf limit keeps its weights in
``name.onnx.data`` beside it (its manifest entry's ``"data"``; ONNX Runtime reads it through
the graph's path), and ``export.json``'s ``"files"`` records every graph file's size and
sha256: a missing or truncated data file is reported before ONNX Runtime trips over it, and
``files_digest`` / ``verify_files`` identify the bytes actually run. The encoder reports the torch
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
#: the graph key of a bucketed image side's shared language model (its buckets' graphs end
#: with its inputs; exports written before the split have none and run each bucket whole)
LANGUAGE_MODEL = "language-model"
#: 2: a bucketed image side's graphs may end at a shared language model graph, which a reader
#: of format 1 would not run (it would take the bucket graph's first output for the vector)
EXPORT_FORMAT = 2
#: formats this vkd reads: 1 (every bucket graph whole) and 2
READ_FORMATS = (1, 2)
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
    if manifest.get("format") not in READ_FORMATS:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r}; this vkd reads formats "
            f"{', '.join(map(str, READ_FORMATS))}. Re-run `vkd export` with this vkd"
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
                if spec.get("language_model"):
                    graphs[f"image:{LANGUAGE_MODEL}"] = spec["language_model"]
            else:
                graphs[tower] = spec
        return graphs

    @property
    def shares_language_model(self) -> bool:
        """Whether the bucket graphs end at the language model's inputs (one shared graph)."""
        return f"image:{LANGUAGE_MODEL}" in self._graph_specs()

    def model_path(self, tower: str, bucket: Bucket | str | None = None) -> Path:
        """The ONNX file of ``tower`` at this encoder's precision; a bucketed image side needs
        ``bucket`` (default: the first), or ``LANGUAGE_MODEL`` for the graph they share."""
        spec = self.manifest.get(tower)
        if not spec:
            reason = self.manifest.get("image_unsupported") or "it was not exported"
            raise ValueError(
                f"{self.dir}: this ONNX export has no {tower} tower ({reason}); encode {tower}s with the torch "
                f"model instead (load_encoder({self.name!r}, prefer='torch'); CLI: --prefer torch)"
            )
        key = tower
        if spec.get("kind") == "buckets" and bucket == LANGUAGE_MODEL:
            if not self.shares_language_model:
                raise ValueError(f"{self.dir}: this export's bucket graphs hold the language model themselves")
            key = f"image:{LANGUAGE_MODEL}"
        elif spec.get("kind") == "buckets":
            assert not isinstance(bucket, str)
            buckets = self.image_buckets or ()
            chosen = bucket or buckets[0]
            if chosen not in buckets:
                raise ValueError(f"{self.dir}: no image bucket {format_bucket(chosen)}; the export has "
                                 f"{', '.join(format_bucket(b) for b in buckets)}")
            key = f"image:{format_bucket(chosen)}"
        return self.dir / self._graph_specs()[key][self.precision]

    def _files_of(self, spec: dict[str, Any]) -> list[Path]:
        data = (spec.get("data") or {}).get(self.precision)
        return [self.dir / spec[self.precision], *([self.dir / data] if data else [])]

    def model_files(self) -> list[Path]:
        """Every file this encoder runs at its precision: each ONNX graph (bucketed exports: one
        per bucket) and its external-data file, if it has one."""
        return [path for spec in self._graph_specs().values() for path in self._files_of(spec)]

    def files_digest(self) -> str:
        """sha256 over the names and contents of ``model_files()`` (cached per file by size and
        mtime, like checkpoint hashes): what identifies the bytes this encoder runs, external
        data included. The fingerprint stays the torch model's, which the parity check ties to."""
        from vkd.models.checkpoint import files_digest

        return files_digest(self.dir, self.model_files())

    def verify_files(self) -> None:
        """Raise ValueError naming each of ``model_files()`` whose content is not what the export
        wrote (sha256 in ``export.json``); exports older than that record are not checked."""
        from vkd.models.checkpoint import file_hashes

        recorded = self.manifest.get("files") or {}
        files = [path for path in self.model_files() if path.name in recorded]
        self._check_sizes(files)
        wrong = [path.name for path, sha in zip(files, file_hashes(files), strict=True)
                 if sha != recorded[path.name].get("sha256")]
        if wrong:
            raise ValueError(f"{self.dir}: {', '.join(wrong)} changed since the export wrote them (sha256 differs "
                             "from export.json); re-run `vkd export` to write a consistent export")

    def _check_sizes(self, files: Sequence[Path]) -> None:
        # Cheap (a stat per file), so done at every session open: ONNX Runtime's own error for a
        # missing or short external-data file names neither the file nor the fix.
        recorded = self.manifest.get("files") or {}
        for path in files:
            if not path.is_file():
                raise ValueError(f"{self.dir}: {path.name} is missing; an export's name.onnx.data files must stay "
                                 "beside their name.onnx (copy the whole folder), or re-run `vkd export`")
            size = (recorded.get(path.name) or {}).get("bytes")
            if size is not None and path.stat().st_size != int(size):
                raise ValueError(f"{self.dir}: {path.name} has {path.stat().st_size} bytes where the export wrote "
                                 f"{size}; it was truncated or replaced. Re-run `vkd export`")

    def _session(self, tower: str, bucket: Bucket | str | None = None) -> Any:
        key = tower if bucket is None else f"{tower}:{bucket if isinstance(bucket, str) else format_bucket(bucket)}"
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    import onnxruntime as ort

                    path = self.model_path(tower, bucket)
                    spec = next(spec for spec in self._graph_specs().values() if spec[self.precision] == path.name)
                    self._check_sizes(self._files_of(spec))
                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    if self.threads:
                        options.intra_op_num_threads = int(self.threads)
                    # by path, so that ONNX Runtime finds external data beside the graph
                    session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
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
            out[rows] = self.run_image_graphs(bucket, {"pixel_values": pixels})
        return out

    def run_image_graphs(self, bucket: Bucket, feed: dict[str, np.ndarray], session: Any = None,
                         language_session: Any = None) -> np.ndarray:
        """Embeddings of one bucket's pixels: its graph, then the shared language model graph
        on its outputs (when the export has one). ``session`` / ``language_session`` replace
        this encoder's own (the export's INT8 trials run through here)."""
        vision = session or self._session("image", bucket)
        outputs = vision.run(None, feed)
        if not self.shares_language_model:
            return outputs[0]
        language = language_session or self._session("image", LANGUAGE_MODEL)
        named = {output.name: value for output, value in zip(vision.get_outputs(), outputs, strict=True)}
        return language.run(None, {name.name: named[name.name] for name in language.get_inputs()})[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "onnx", "precision": self.precision, "dir": str(self.dir)}

    def __repr__(self) -> str:
        return (f"OnnxEncoder(dir={str(self.dir)!r}, family={self.family!r}, dim={self.dim}, "
                f"precision={self.precision!r})")
