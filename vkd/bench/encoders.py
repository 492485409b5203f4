"""Shared measurements on encoders: a held-out split's vectors, Recall@K, encode latency.

The distill and export benchmarks compare several encoders (torch, ONNX fp32, ONNX INT8;
teacher and students) on the same images and captions with the same code: images are
decoded once up front, so every encoder's timing covers preprocessing and the forward
pass, not disk reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.bench.timing import qps_from_batches, time_calls

if TYPE_CHECKING:
    from PIL import Image

    from vkd.data.pairs import PairSet
    from vkd.models.base import Encoder


@dataclass
class Split:
    """A pair file's unique images (decoded) and captions, grouped for Recall@K."""

    source: Path
    images: list[Image.Image]
    texts: list[str]
    text_to_image: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.images)


def load_split(pairs: str | os.PathLike[str] | PairSet, *, max_images: int | None = None) -> Split:
    """Decode the images of a pair file (its first ``max_images`` unique images and their captions)."""
    from vkd.data.pairs import PairSet, read_pairs
    from vkd.models.base import load_rgb

    pair_set = pairs if isinstance(pairs, PairSet) else read_pairs(pairs)
    if len(pair_set) == 0:
        raise ValueError(f"{pair_set.source or pairs}: no pairs; a benchmark needs images with captions")
    paths = pair_set.images()
    t2i = pair_set.text_to_image
    keep = len(paths) if max_images is None else min(max_images, len(paths))
    texts = [text for text, image in zip(pair_set.texts(), t2i, strict=True) if image < keep]
    return Split(Path(str(pair_set.source or "")), [load_rgb(p) for p in paths[:keep]], texts,
                 t2i[t2i < keep].astype(np.int64))


def encode_split(encoder: Encoder, split: Split, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(image vectors [n_images, d], text vectors [n_texts, d]), L2-normalised."""
    images = encoder.encode_images(split.images, batch_size=batch_size)
    texts = encoder.encode_text(split.texts, batch_size=batch_size)
    return images, texts


def recall(image_vectors: np.ndarray, text_vectors: np.ndarray, split: Split) -> dict[str, float]:
    """Recall@1/5/10 both directions and rsum (percent), as ``vkd eval`` computes them."""
    from vkd.evaluate import recall_at_k

    return recall_at_k(text_vectors, image_vectors, split.text_to_image)


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Mean and min cosine between matching rows (vectors are already normalised)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"cannot compare vectors of shapes {reference.shape} and {candidate.shape}")
    cosines = np.sum(reference.astype(np.float64) * candidate.astype(np.float64), axis=1)
    return {"mean": float(cosines.mean()), "min": float(cosines.min()), "n": int(len(cosines))}


def _cycle(items: list[Any], count: int, start: int) -> list[Any]:
    return [items[(start + i) % len(items)] for i in range(count)]


def encode_latency(encoder: Encoder, split: Split, *, batch: int = 32, repeats: int = 30,
                   batch_repeats: int = 8, warmup: int = 2) -> dict[str, Any]:
    """Latency of encoding images and texts at batch 1 and ``batch``.

    ``ms_per_image`` / ``ms_per_query`` are p50 of one item at batch 1; ``*_at_batch``
    are the p50 time of a batch divided by its size (throughput view). Each call takes the
    next items of the split, cycling.
    """
    out: dict[str, Any] = {"batch": batch}
    for kind, items, encode in (("image", split.images, encoder.encode_images),
                                ("text", split.texts, encoder.encode_text)):
        cursor = [0]

        def call(size: int, items: list[Any] = items, encode: Any = encode, cursor: list[int] = cursor) -> None:
            chunk = _cycle(items, size, cursor[0])
            cursor[0] += size
            encode(chunk, batch_size=size)

        one = time_calls(lambda call=call: call(1), repeats=repeats, warmup=warmup)
        many = time_calls(lambda call=call: call(batch), repeats=batch_repeats, warmup=1)
        out[kind] = {
            "batch1": one.summary(),
            f"batch{batch}": many.summary(),
            "per_item_ms_batch1": one.summary()["p50_ms"],
            f"per_item_ms_batch{batch}": many.summary()["p50_ms"] / batch,
            f"items_per_s_batch{batch}": qps_from_batches(batch, many.seconds),
        }
    out["ms_per_image"] = out["image"]["per_item_ms_batch1"]
    out["ms_per_query"] = out["text"]["per_item_ms_batch1"]
    out["ms_per_image_at_batch"] = out["image"][f"per_item_ms_batch{batch}"]
    out["ms_per_query_at_batch"] = out["text"][f"per_item_ms_batch{batch}"]
    return out


def parameter_count(encoder: Encoder) -> int | None:
    """Parameters of a torch encoder's model (None for an encoder without one)."""
    model = getattr(encoder, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return int(sum(p.numel() for p in model.parameters()))


def onnx_bytes(encoder: Encoder) -> int | None:
    """Bytes on disk of an ONNX encoder's model files at its precision (None for torch)."""
    manifest = getattr(encoder, "manifest", None)
    if manifest is None:
        return None
    total = 0
    for tower in ("text", "image"):
        spec = manifest.get(tower)
        if spec and spec.get(encoder.precision):
            total += (Path(encoder.dir) / spec[encoder.precision]).stat().st_size
    return total
