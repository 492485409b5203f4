"""Encoders: one interface (``Encoder``), one loader (``load_encoder``), several backends."""

from vkd.models.base import Encoder, TorchEncoder
from vkd.models.registry import SUPPORTED_FAMILIES, detect_family, load_encoder

__all__ = ["Encoder", "TorchEncoder", "SUPPORTED_FAMILIES", "detect_family", "load_encoder"]
