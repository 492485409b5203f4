"""Encoders: one interface (``Encoder``), one loader (``load_encoder``), several backends.

Names load on first use: ``vkd model --help`` (and ``vkd --help``, which looks this package up)
must not pay for numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Encoder": "vkd.models.base",
    "TorchEncoder": "vkd.models.base",
    "SUPPORTED_FAMILIES": "vkd.models.registry",
    "detect_family": "vkd.models.registry",
    "load_encoder": "vkd.models.registry",
}

__all__ = ["Encoder", "TorchEncoder", "SUPPORTED_FAMILIES", "detect_family", "load_encoder"]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.models.base import Encoder, TorchEncoder
    from vkd.models.registry import SUPPORTED_FAMILIES, detect_family, load_encoder

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
