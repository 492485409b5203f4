"""Shared measurements on encoders: a held-out split's vectors, Recall@K, encode latency.

The distill and export benchmarks compare several encoders (torch, ONNX fp32, ONNX INT8;
teacher and students) on the same images and captions with the same code: images are
decoded once up front, so every encoder's timing covers preprocessing and the forward
pass, not disk reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.bench.timing import latency_summary, qps_from_batches, ratio_spread, spread

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


def encode_latency_rounds(encoders: Mapping[str, Encoder], split: Split, *, batch: int = 32, repeats: int = 30,
                          batch_repeats: int = 8, warmup: int = 2, rounds: int = 5) -> dict[str, dict[str, Any]]:
    """Latency of encoding images and texts at batch 1 and ``batch``, for several encoders
    timed in ``rounds`` interleaved rounds.

    In each round every encoder (in an order that rotates between rounds) encodes, per kind,
    ``repeats // rounds`` single items and ``batch_repeats // rounds`` batches (at least one
    each), taking the next items of the split, cycling. Per encoder the result holds the
    pooled summaries as ``encode_latency`` always had (``ms_per_image`` = p50 of one image at
    batch 1, ``*_at_batch`` = p50 of a batch over its size) and, per kind, ``rounds``: each
    round's p50 as a ``spread`` and as a list, so that two encoders can be compared round by
    round (``vkd.bench.timing.ratio_spread``).
    """
    rounds = max(1, rounds)
    names = list(encoders)
    per_round = max(1, repeats // rounds)
    per_round_batches = max(1, batch_repeats // rounds)
    kinds = (("image", split.images, "encode_images"), ("text", split.texts, "encode_text"))
    cursors = {(name, kind): [0] for name in names for kind, _, _ in kinds}

    def call(name: str, kind: str, size: int) -> float:
        items = split.images if kind == "image" else split.texts
        cursor = cursors[(name, kind)]
        chunk = _cycle(items, size, cursor[0])
        cursor[0] += size
        encode = getattr(encoders[name], "encode_images" if kind == "image" else "encode_text")
        start = time.perf_counter()
        encode(chunk, batch_size=size)
        return time.perf_counter() - start

    for name in names:  # first calls pay for allocator and kernel set-up
        for kind, _, _ in kinds:
            for _ in range(warmup):
                call(name, kind, 1)
            call(name, kind, batch)
    single: dict[tuple[str, str], list[list[float]]] = {(n, k): [] for n in names for k, _, _ in kinds}
    batched: dict[tuple[str, str], list[list[float]]] = {(n, k): [] for n in names for k, _, _ in kinds}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for kind, _, _ in kinds:
                single[(name, kind)].append([call(name, kind, 1) for _ in range(per_round)])
                batched[(name, kind)].append([call(name, kind, batch) for _ in range(per_round_batches)])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        record: dict[str, Any] = {"batch": batch, "rounds": rounds}
        for kind, _, _ in kinds:
            ones = [t for block in single[(name, kind)] for t in block]
            many = [t for block in batched[(name, kind)] for t in block]
            one_summary = {**latency_summary(ones), "warmup": warmup}
            many_summary = {**latency_summary(many), "warmup": 1}
            b1_rounds = [1000.0 * float(np.median(block)) for block in single[(name, kind)]]
            bb_rounds = [1000.0 * float(np.median(block)) / batch for block in batched[(name, kind)]]
            record[kind] = {
                "batch1": one_summary,
                f"batch{batch}": many_summary,
                "per_item_ms_batch1": one_summary["p50_ms"],
                f"per_item_ms_batch{batch}": many_summary["p50_ms"] / batch,
                f"items_per_s_batch{batch}": qps_from_batches(batch, many),
                "rounds": {"batch1_ms": spread(b1_rounds), f"batch{batch}_ms_per_item": spread(bb_rounds),
                           "batch1_round_ms": b1_rounds, f"batch{batch}_round_ms_per_item": bb_rounds},
            }
        record["ms_per_image"] = record["image"]["per_item_ms_batch1"]
        record["ms_per_query"] = record["text"]["per_item_ms_batch1"]
        record["ms_per_image_at_batch"] = record["image"][f"per_item_ms_batch{batch}"]
        record["ms_per_query_at_batch"] = record["text"][f"per_item_ms_batch{batch}"]
        out[name] = record
    return out


def encode_latency(encoder: Encoder, split: Split, *, batch: int = 32, repeats: int = 30,
                   batch_repeats: int = 8, warmup: int = 2, rounds: int = 5) -> dict[str, Any]:
    """``encode_latency_rounds`` for one encoder (its rounds follow one another)."""
    return encode_latency_rounds({"encoder": encoder}, split, batch=batch, repeats=repeats,
                                 batch_repeats=batch_repeats, warmup=warmup, rounds=rounds)["encoder"]


def speedups(reference: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``other``'s speed-up over ``reference`` per kind and batch, within each round (both
    from one ``encode_latency_rounds`` call)."""
    batch = reference["batch"]
    out: dict[str, Any] = {}
    for kind in ("image", "text"):
        for key in ("batch1_round_ms", f"batch{batch}_round_ms_per_item"):
            a, b = reference[kind]["rounds"][key], other[kind]["rounds"][key]
            count = min(len(a), len(b))
            label = f"{kind}_b1" if key.startswith("batch1_") else f"{kind}_b{batch}"
            out[label] = ratio_spread(a[:count], b[:count]) if count and min(b[:count]) > 0 else None
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
