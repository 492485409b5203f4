"""ONNX export of a student (fp32 + INT8, parity-checked) and the torch-free ONNX backend.

Importing this package loads neither torch nor transformers; ``export_onnx`` does, when
called.
"""

from vkd.export.onnx_encoder import OnnxEncoder, read_export_manifest
from vkd.export.onnx_export import PARITY_MIN_COSINE, ExportError, ExportResult, export_onnx

__all__ = ["OnnxEncoder", "read_export_manifest", "export_onnx", "ExportError", "ExportResult", "PARITY_MIN_COSINE"]
