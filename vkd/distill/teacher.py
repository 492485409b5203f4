"""Teachers: frozen models behind an Arrow cache of their embeddings, and the EMA copy of the
student (online distillation).

Teacher cache
-------------
A frozen teacher gives a training sample the same embeddings every time, so they are stored
once: ``<cache_dir>/<teacher fingerprint>.arrow`` is an Arrow IPC file with one row per
sample, columns ``key`` (string), ``text`` and ``image`` (``FixedSizeList<float32>[dim]``,
L2-normalised), and schema metadata naming the format version, the teacher, its fingerprint,
dimension and logit scale. The fingerprint hashes the teacher's weights and preprocessing,
and ``key`` (:func:`cache_key`) hashes the sha256 of the image file's bytes and the caption:
a row answers for the same teacher on the same content, wherever the image lies and whatever
it is called. Two data sets with the same file names and captions (every ``vkd data synth``
output) share no rows unless their images are the same bytes, an image edited in place misses
the cache, and a copy of an image elsewhere hits it. Other runs, stages and epochs reuse the
file. Embeddings are kept in float32 so a cached run trains exactly as an uncached one.

Version 1 files keyed rows by the image path as written; they are ignored with a warning and
replaced at the next flush (the teacher recomputes their rows once).

New rows are collected in memory and written by :meth:`TeacherCache.flush` (the trainer calls
it at the end of each epoch and before each checkpoint): the file on disk is read again, the
new rows appended, and the whole written beside it and renamed over it, so the file is always
complete, and two runs sharing a cache directory only ever add rows. With several processes
the rows of every rank are gathered and the main process writes.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from vkd.distill.losses import TeacherOutput

if TYPE_CHECKING:
    from vkd.distill.data import TeacherInputs
    from vkd.models.base import TorchEncoder

CACHE_FORMAT = "vkd-teacher-cache"
CACHE_VERSION = 2


def cache_key(image_sha256: str, caption: str) -> str:
    """The row key of one training sample: a hash of the image file's content hash and the
    caption. The teacher is named by the cache file (its fingerprint), not by the key."""
    return hashlib.sha256(f"{image_sha256}\n{caption}".encode()).hexdigest()[:32]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class TeacherCache:
    """Embeddings of one teacher, keyed by :func:`cache_key`; see the module docstring for the format."""

    def __init__(self, directory: str | os.PathLike[str], *, fingerprint: str, dim: int,
                 logit_scale: float, teacher: str) -> None:
        self.path = Path(directory) / f"{fingerprint}.arrow"
        self.fingerprint, self.dim, self.logit_scale, self.teacher = fingerprint, int(dim), float(logit_scale), teacher
        self.hits = 0
        self.misses = 0
        self._pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._rows: dict[str, int] = {}
        self._text = self._image = np.zeros((0, self.dim), dtype=np.float32)
        self._warned = False
        self.reload()

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> frozenset[str]:
        """Keys the file holds (rows added since the last flush are not included)."""
        return frozenset(self._rows)

    def _read(self) -> pa.Table | None:
        if not self.path.is_file():
            return None
        with pa.memory_map(str(self.path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != CACHE_FORMAT or int(meta.get("dim", -1)) != self.dim:
            raise ValueError(
                f"{self.path}: not a teacher cache for a {self.dim}-d teacher (metadata {meta}); "
                "delete the file or point teacher_cache_dir elsewhere"
            )
        version = meta.get("version")
        if version != str(CACHE_VERSION):
            # Its keys mean something else (v1: the image path as written): reading them
            # would hand an edited image its old vector. Treated as empty, replaced at flush.
            if not self._warned:
                warnings.warn(
                    f"{self.path}: teacher cache format version {version} (rows keyed by image path); this "
                    f"vkd keys rows by image content (version {CACHE_VERSION}). The file is ignored and "
                    "replaced at the next flush; the teacher computes its rows once more.",
                    UserWarning, stacklevel=3,
                )
                self._warned = True
            return None
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.path}: holds the rows of teacher fingerprint {meta.get('fingerprint')}, not "
                f"{self.fingerprint} (a renamed or copied file?); delete it or point teacher_cache_dir elsewhere"
            )
        return table

    def reload(self) -> None:
        """Read the file again (after this or another process flushed)."""
        table = self._read()
        if table is None or table.num_rows == 0:
            return
        self._rows = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        self._text = _matrix(table.column("text"), self.dim)
        self._image = _matrix(table.column("image"), self.dim)

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(text, image) float32 [n, dim] for keys the file holds; counts them as hits."""
        rows = np.fromiter((self._rows[key] for key in keys), dtype=np.int64, count=len(keys))
        self.hits += len(rows)
        return self._text[rows], self._image[rows]

    def add(self, keys: Sequence[str], text: np.ndarray, image: np.ndarray) -> None:
        """Rows computed by the teacher; counted as misses, written at the next flush."""
        self.misses += len(keys)
        self._pending.append((list(keys), np.asarray(text, np.float32), np.asarray(image, np.float32)))

    def flush(self) -> int:
        """Write every process's new rows into the file (collective with several processes);
        returns the number of rows added."""
        pending = self._pending
        self._pending = []
        if _distributed():
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, pending)
            pending = [part for rank_parts in everyone for part in rank_parts]
        added = 0
        if not _distributed() or dist.get_rank() == 0:
            added = self._write(pending)
        if _distributed():
            dist.barrier()
        self.reload()
        return added

    def _write(self, pending: list[tuple[list[str], np.ndarray, np.ndarray]]) -> int:
        if not pending:
            return 0
        existing = self._read()  # again: another run may have added rows since we loaded
        known = set(existing.column("key").to_pylist()) if existing is not None else set()
        all_keys = [key for part_keys, _, _ in pending for key in part_keys]
        keep = []
        for row, key in enumerate(all_keys):
            if key not in known:
                known.add(key)
                keep.append(row)
        if not keep:
            return 0
        keys = [all_keys[row] for row in keep]
        texts = np.concatenate([text for _, text, _ in pending])[keep]
        images = np.concatenate([image for _, _, image in pending])[keep]
        meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "fingerprint": self.fingerprint,
                "teacher": self.teacher, "dim": str(self.dim), "logit_scale": repr(self.logit_scale)}
        vector = pa.list_(pa.float32(), self.dim)
        schema = pa.schema([("key", pa.string()), ("text", vector), ("image", vector)], metadata=meta)
        new = pa.table({
            "key": pa.array(keys, pa.string()),
            "text": _fixed_list(texts, self.dim),
            "image": _fixed_list(images, self.dim),
        }, schema=schema)
        table = new if existing is None else pa.concat_tables([existing.replace_schema_metadata(meta), new])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                # one record batch: readers get single-chunk columns, viewed without copies
                writer.write_table(table.combine_chunks())
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        return len(keys)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": len(self), "hits": self.hits, "misses": self.misses}


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    values = column.combine_chunks().flatten()  # flatten, not .values: honours a slice's offset
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def _fixed_list(matrix: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim)


@dataclass
class Teacher:
    """A frozen teacher in the ensemble: its encoder, weight and cache, and how often it ran."""

    encoder: TorchEncoder
    weight: float = 1.0
    cache: TeacherCache | None = None
    forward_rows: int = 0
    forward_calls: int = 0
    name: str = field(default="")

    def __post_init__(self) -> None:
        self.name = self.name or self.encoder.name
        self.encoder.model.eval().requires_grad_(False)

    @torch.no_grad()
    def output(self, keys: Sequence[str] | None, inputs: TeacherInputs | None, device: torch.device) -> TeacherOutput:
        """Embeddings for a batch: rows the cache holds from the cache, the rest from the model.
        ``keys``: each row's :func:`cache_key`; None when no teacher caches, and then every
        row is in ``inputs``."""
        if keys is None and (inputs is None or self.cache is not None):
            raise RuntimeError(f"teacher {self.name}: the batch carries no cache keys (Collator without caches?)")
        n, dim = len(keys) if keys is not None else len(inputs.rows), self.encoder.dim
        text = torch.empty(n, dim, device=device)
        image = torch.empty(n, dim, device=device)
        computed = set(inputs.rows) if inputs is not None else set()
        cached = [i for i in range(n) if i not in computed]
        if cached:
            if self.cache is None:
                raise RuntimeError(f"teacher {self.name}: rows {cached} were not prepared and there is no cache")
            hit_text, hit_image = self.cache.lookup([keys[i] for i in cached])
            text[cached] = torch.from_numpy(hit_text).to(device)
            image[cached] = torch.from_numpy(hit_image).to(device)
        if inputs is not None:
            new_text = torch.cat([self.encoder.embed_text(chunk).float() for chunk in inputs.text_chunks])
            new_image = torch.cat([self.encoder.embed_images(chunk).float() for chunk in inputs.image_chunks])
            self.forward_calls += len(inputs.text_chunks) + len(inputs.image_chunks)
            self.forward_rows += len(inputs.rows)
            text[inputs.rows] = new_text.to(device)
            image[inputs.rows] = new_image.to(device)
            if self.cache is not None:
                self.cache.add([keys[i] for i in inputs.rows], new_text.cpu().numpy(), new_image.cpu().numpy())
        return TeacherOutput(text=text, image=image, logit_scale=float(self.encoder.logit_scale), weight=self.weight)

    def describe(self) -> dict[str, Any]:
        info = {
            "name": self.name, "family": self.encoder.family, "dim": self.encoder.dim,
            "parameters": self.encoder.num_parameters(), "weight": self.weight,
            "fingerprint": self.encoder.fingerprint,
            "forward_calls": self.forward_calls, "forward_rows": self.forward_rows,
        }
        if self.cache is not None:
            info["cache"] = self.cache.describe()
        return info


class EmaTeacher:
    """A momentum copy of the student used as an extra teacher (online distillation).

    Every ``every`` optimiser steps, each trained parameter moves as
    ``ema = momentum · ema + (1 − momentum) · student``; frozen parameters are shared values and
    never change. It runs on the student's own inputs, in eval mode (no dropout).
    """

    def __init__(self, student: TorchEncoder, *, momentum: float, every: int, weight: float = 1.0) -> None:
        self.momentum, self.every, self.weight = float(momentum), int(every), float(weight)
        self.encoder = copy.copy(student)
        self.encoder.model = copy.deepcopy(student.model).eval().requires_grad_(False)
        self.encoder.invalidate_fingerprint()
        ema_params = dict(self.encoder.model.named_parameters())
        self._pairs = [(name, ema_params[name], param)
                       for name, param in student.model.named_parameters() if param.requires_grad]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for _, ema, param in self._pairs:
            ema.lerp_(param.detach().to(ema.dtype), 1.0 - self.momentum)
        self.updates += 1

    @torch.no_grad()
    def output(self, text_chunks: Sequence[dict], image_chunks: Sequence[dict]) -> TeacherOutput:
        text = torch.cat([self.encoder.embed_text(chunk) for chunk in text_chunks])
        image = torch.cat([self.encoder.embed_images(chunk) for chunk in image_chunks])
        return TeacherOutput(text=text.float(), image=image.float(),
                             logit_scale=float(self.encoder.logit_scale), weight=self.weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: ema.detach().cpu().contiguous() for name, ema, _ in self._pairs}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, ema, _ in self._pairs:
            ema.copy_(state[name])

    def describe(self) -> dict[str, Any]:
        return {"name": "ema", "momentum": self.momentum, "every": self.every, "weight": self.weight,
                "updates": self.updates}


def make_teachers(
    encoders: Sequence[TorchEncoder],
    *,
    names: Sequence[str],
    weights: Sequence[float] | None,
    cache_dir: str | os.PathLike[str] | None,
) -> list[Teacher]:
    """The frozen part of the ensemble: one ``Teacher`` per encoder, each with its weight
    (equal without ``weights``) and, when ``cache_dir`` is given, its cache file there."""
    if weights is not None and len(weights) != len(encoders):
        raise ValueError(f"teacher_weights has {len(weights)} entries for {len(encoders)} teachers; "
                         "give one weight per teacher")
    teachers = []
    for k, encoder in enumerate(encoders):
        cache = None
        if cache_dir is not None:
            cache = TeacherCache(cache_dir, fingerprint=encoder.fingerprint, dim=encoder.dim,
                                 logit_scale=float(encoder.logit_scale), teacher=encoder.name)
        teachers.append(Teacher(encoder, weight=float(weights[k]) if weights else 1.0, cache=cache,
                                name=names[k] if k < len(names) else encoder.name))
    return teachers


def cache_summary(teachers: Sequence[Teacher]) -> dict[str, int]:
    """Hits and misses over every teacher, for the report."""
    caches = [t.cache for t in teachers if t.cache is not None]
    return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
            "rows": sum(len(c) for c in caches)}
