"""ONNX export of a student (fp32 + INT8, parity-checked) and the torch-free ONNX backend.

Importing this package loads neither torch nor transformers; ``export_onnx`` does, when
called. Names load on first use so that ``vkd --help`` does not load numpy or PIL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "OnnxEncoder": "vkd.export.onnx_encoder",
    "read_export_manifest": "vkd.export.onnx_encoder",
    "export_onnx": "vkd.export.onnx_export",
    "ExportError": "vkd.export.onnx_export",
    "ExportResult": "vkd.export.onnx_export",
    "PARITY_MIN_COSINE": "vkd.export.onnx_export",
}

__all__ = ["OnnxEncoder", "read_export_manifest", "export_onnx", "ExportError", "ExportResult", "PARITY_MIN_COSINE"]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.export.onnx_encoder import OnnxEncoder, read_export_manifest
    from vkd.export.onnx_export import PARITY_MIN_COSINE, ExportError, ExportResult, export_onnx

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
