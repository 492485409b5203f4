"""Training batches over a pair file: a deterministic order, and a collate that prepares the
inputs of every model that needs them.

The order of an epoch is a permutation drawn from ``seed + epoch`` alone, cut into global
batches of ``batch_size × processes`` pairs (the tail that does not fill one is dropped, so
every contrastive step sees the same number of negatives); process ``r`` takes rows
``r·batch_size … (r+1)·batch_size`` of each. So a resumed run finds its place by counting
batches, and the order never depends on what ran before.

The collate (run in DataLoader workers when ``num_workers > 0``) decodes each image once and
prepares the student's inputs, split into chunks for gradient caching, and each teacher's
inputs for the rows its cache does not hold. Teachers whose cache already holds every row of
the batch cost nothing here, which is what makes a warm cache nearly free.

With a teacher cache the collate also hashes each image file's bytes, from the same read that
decodes them, for the rows' cache keys (``vkd.distill.teacher.cache_key``): a key always names
the bytes the teacher would see, and hashing a file just read costs a fraction of decoding
it, so no hash is kept between epochs (one kept by path, size and mtime would miss an edit
that keeps the mtime).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vkd.data.images import read_image_file
from vkd.distill.teacher import cache_key
from vkd.models.base import TorchEncoder, batched, load_rgb

if TYPE_CHECKING:
    from vkd.data.pairs import PairSet


class PairDataset(Dataset):
    """Item ``i`` is ``(i, pair)``; images are decoded by the collate, once per batch."""

    def __init__(self, pairs: PairSet) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.pairs[index]


def steps_per_epoch(n_pairs: int, batch_size: int, num_processes: int) -> int:
    return n_pairs // (batch_size * num_processes)


def epoch_batches(
    n_pairs: int, *, batch_size: int, num_processes: int, rank: int, seed: int, epoch: int
) -> list[list[int]]:
    """This process's batches (dataset indices) for ``epoch``, in order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator).tolist()
    global_batch = batch_size * num_processes
    batches = []
    for start in range(0, steps_per_epoch(n_pairs, batch_size, num_processes) * global_batch, global_batch):
        mine = start + rank * batch_size
        batches.append(order[mine : mine + batch_size])
    return batches


@dataclass
class TeacherInputs:
    """Inputs of one teacher for the rows of a batch it must run on, in chunks."""

    rows: list[int]
    text_chunks: list[dict[str, torch.Tensor]]
    image_chunks: list[dict[str, torch.Tensor]]


def inputs_only(encoder: TorchEncoder) -> TorchEncoder:
    """A shallow copy without the model: ``tokenize``/``preprocess`` need only the tokenizer and
    processors, and workers then never receive (or pickle) the weights."""
    light = copy.copy(encoder)
    light.model = None  # type: ignore[assignment]
    return light


class Collator:
    """Turns a list of ``(index, pair)`` into a training batch (a dict).

    ``teachers[k]`` is ``(encoder, cached_keys)``: the teacher's input preparer and the cache
    keys its cache held when the epoch started (``None``: no cache, prepare every row). An
    epoch never shows a sample twice, so that snapshot is exactly what the cache can answer
    (two samples with the same content may both be prepared; the cache stores one row).
    """

    def __init__(
        self,
        student: TorchEncoder,
        teachers: Sequence[tuple[TorchEncoder, frozenset[str] | None]],
        image_index: np.ndarray,
        chunk_size: int | None,
    ) -> None:
        self.student = inputs_only(student)
        self.teachers = [(inputs_only(encoder), cached) for encoder, cached in teachers]
        self.image_index = image_index
        self.chunk_size = chunk_size
        # content keys are needed only where some teacher has a cache to look them up in
        self.keyed = any(cached is not None for _, cached in self.teachers)

    def __call__(self, items: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        indices = [index for index, _ in items]
        pairs = [pair for _, pair in items]
        texts = [pair.text for pair in pairs]
        sample_ids = [pair.sample_id for pair in pairs]
        keys: list[str] | None = None
        if self.keyed:
            # the same reader and bounds as load_rgb, plus the sha256 of the bytes it decoded
            reads = [read_image_file(pair.image, sha256=True) for pair in pairs]
            images = [read.image for read in reads]
            keys = [cache_key(read.sha256, pair.text) for read, pair in zip(reads, pairs, strict=True)]
        else:
            images = [load_rgb(pair.image) for pair in pairs]
        size = self.chunk_size or len(items)
        batch: dict[str, Any] = {
            "indices": torch.tensor(indices, dtype=torch.long),
            "image_index": torch.as_tensor(self.image_index[indices], dtype=torch.long),
            "sample_ids": sample_ids,
            "cache_keys": keys,
            "text_chunks": [self.student.tokenize(chunk) for chunk in batched(texts, size)],
            "image_chunks": [self.student.preprocess(chunk) for chunk in batched(images, size)],
            "teachers": [],
        }
        for encoder, cached in self.teachers:
            if cached is None:
                rows = list(range(len(pairs)))
            else:
                rows = [i for i, key in enumerate(keys or []) if key not in cached]
            if not rows:
                batch["teachers"].append(None)
                continue
            step = encoder.batch_size
            batch["teachers"].append(TeacherInputs(
                rows=rows,
                text_chunks=[encoder.tokenize([texts[i] for i in part]) for part in batched(rows, step)],
                image_chunks=[encoder.preprocess([images[i] for i in part]) for part in batched(rows, step)],
            ))
        return batch


def make_loader(
    pairs: PairSet,
    batches: list[list[int]],
    collator: Collator,
    *,
    num_workers: int,
    seed: int,
) -> DataLoader:
    """A DataLoader over fixed ``batches``. Its own generator keeps the global RNG untouched
    (a DataLoader draws a base seed when iterated), so resuming mid-epoch replays the same
    random stream as the uninterrupted run."""
    return DataLoader(
        PairDataset(pairs),
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
