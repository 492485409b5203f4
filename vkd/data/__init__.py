"""Pair datasets (JSON Lines), the Flickr30k converter and synthetic scenes.

Names are imported on first use so that ``vkd --help`` (which looks up
``vkd.data.commands``) does not pay for numpy or PIL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Pair": "vkd.data.pairs",
    "PairSet": "vkd.data.pairs",
    "PairFileError": "vkd.data.pairs",
    "read_pairs": "vkd.data.pairs",
    "write_pairs": "vkd.data.pairs",
    "sample_id_for": "vkd.data.pairs",
    "convert_karpathy": "vkd.data.flickr30k",
}

__all__ = [
    "Pair",
    "PairFileError",
    "PairSet",
    "convert_karpathy",
    "read_pairs",
    "sample_id_for",
    "write_pairs",
]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.data.flickr30k import convert_karpathy
    from vkd.data.pairs import Pair, PairFileError, PairSet, read_pairs, sample_id_for, write_pairs


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
