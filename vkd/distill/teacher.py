"""Teachers: frozen models behind an Arrow cache of their embeddings, and the EMA copy of the
student (online distillation).

Teacher cache
-------------
A frozen teacher gives a training sample the same embeddings every time, so they are stored
once, in ``<cache_dir>/<teacher fingerprint>/``: a folder of **segments**, each an Arrow IPC
file with one record batch, columns ``key`` (string), ``text`` and ``image``
(``FixedSizeList<float32>[dim]``, L2-normalised), and schema metadata naming the format
version, the teacher, its fingerprint, dimension and logit scale. The fingerprint hashes the
teacher's weights and preprocessing, and ``key`` (:func:`cache_key`) hashes the sha256 of the
image file's bytes and the caption: a row answers for the same teacher on the same content,
wherever the image lies and whatever it is called. Two data sets with the same file names and
captions (every ``vkd data synth`` output) share no rows unless their images are the same
bytes, an image edited in place misses the cache, and a copy of an image elsewhere hits it.
Other runs, stages and epochs reuse the rows. Embeddings are kept in float32 so a cached run
trains exactly as an uncached one.

Writing is append-only, one writer per process (per rank): :meth:`TeacherCache.flush` (the
trainer calls it at the end of each epoch and before each checkpoint, on every rank) writes
this process's new rows as a new segment, named by host, pid, rank and a counter, to a
temporary name that is fsynced and renamed into the folder. No file is ever rewritten and
no rank sends its rows to another, so two ranks, or two runs sharing a cache directory,
cannot lose each other's rows: each only adds files. After writing, ranks meet at a barrier
and every rank reads the segments it has not read yet, so the next epoch's snapshot holds
every rank's rows. A reader reads every segment (in name order; a key found twice, computed
by two runs at once, answers with its first row) and maps each one: its vectors are not
copied into memory.

Version 2 kept a single file ``<cache_dir>/<teacher fingerprint>.arrow``, rewritten whole at
each flush; it is still read (as the first segment) and never written again. Version 1 files
keyed rows by the image path as written; they are ignored with a warning and removed at the
next flush (the teacher recomputes their rows once).
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
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
CACHE_VERSION = 3
#: the single-file format (``<fingerprint>.arrow``) still read, never written
LEGACY_VERSION = 2
SEGMENT_SUFFIX = ".arrow"


def cache_key(image_sha256: str, caption: str) -> str:
    """The row key of one training sample: a hash of the image file's content hash and the
    caption. The teacher is named by the cache folder (its fingerprint), not by the key."""
    return hashlib.sha256(f"{image_sha256}\n{caption}".encode()).hexdigest()[:32]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


class TeacherCache:
    """Embeddings of one teacher, keyed by :func:`cache_key`; see the module docstring for the format."""

    def __init__(self, directory: str | os.PathLike[str], *, fingerprint: str, dim: int,
                 logit_scale: float, teacher: str) -> None:
        #: the segment folder this process writes into
        self.path = Path(directory) / fingerprint
        #: the version 2 single file, read if present
        self.legacy_path = Path(directory) / f"{fingerprint}{SEGMENT_SUFFIX}"
        self.fingerprint, self.dim, self.logit_scale, self.teacher = fingerprint, int(dim), float(logit_scale), teacher
        self.hits = 0
        self.misses = 0
        self._pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._rows: dict[str, tuple[int, int]] = {}  # key -> (segment number, row)
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []  # (text, image) views of mapped files
        self._loaded: set[str] = set()
        self._written = 0
        self._stale_v1 = False
        self._warned = False
        self.reload()

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> frozenset[str]:
        """Keys the segments read so far hold (rows added since the last flush are not included)."""
        return frozenset(self._rows)

    def segment_files(self) -> list[Path]:
        """Every segment on disk, in the order they are read (the version 2 file first)."""
        files = [self.legacy_path] if self.legacy_path.is_file() else []
        if self.path.is_dir():
            files += sorted(p for p in self.path.iterdir()
                            if p.suffix == SEGMENT_SUFFIX and not p.name.startswith("."))
        return files

    def _read(self, path: Path) -> pa.Table | None:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != CACHE_FORMAT or int(meta.get("dim", -1)) != self.dim:
            raise ValueError(
                f"{path}: not a teacher cache for a {self.dim}-d teacher (metadata {meta}); "
                "delete the file or point teacher_cache_dir elsewhere"
            )
        version = meta.get("version")
        if version not in (str(CACHE_VERSION), str(LEGACY_VERSION)):
            # Its keys mean something else (v1: the image path as written): reading them
            # would hand an edited image its old vector. Treated as empty, removed at flush.
            if not self._warned:
                warnings.warn(
                    f"{path}: teacher cache format version {version} (rows keyed by image path); this "
                    f"vkd keys rows by image content (version {CACHE_VERSION}). The file is ignored and "
                    "replaced at the next flush; the teacher computes its rows once more.",
                    UserWarning, stacklevel=3,
                )
                self._warned = True
            self._stale_v1 = path == self.legacy_path
            return None
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{path}: holds the rows of teacher fingerprint {meta.get('fingerprint')}, not "
                f"{self.fingerprint} (a renamed or copied file?); delete it or point teacher_cache_dir elsewhere"
            )
        return table

    def reload(self) -> None:
        """Read the segments not read yet (this or another process flushed since)."""
        for path in self.segment_files():
            if path.name in self._loaded:
                continue
            self._loaded.add(path.name)
            table = self._read(path)
            if table is None or table.num_rows == 0:
                continue
            number = len(self._segments)
            self._segments.append((_matrix(table.column("text"), self.dim), _matrix(table.column("image"), self.dim)))
            for row, key in enumerate(table.column("key").to_pylist()):
                self._rows.setdefault(key, (number, row))  # first come answers: segments are read in name order

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(text, image) float32 [n, dim] for keys the segments hold; counts them as hits."""
        text = np.empty((len(keys), self.dim), dtype=np.float32)
        image = np.empty((len(keys), self.dim), dtype=np.float32)
        where = [self._rows[key] for key in keys]
        # one gather per segment: rows of a segment are read from its mapped file together
        by_segment: dict[int, list[int]] = {}
        for position, (segment, _row) in enumerate(where):
            by_segment.setdefault(segment, []).append(position)
        for segment, positions in by_segment.items():
            rows = np.fromiter((where[p][1] for p in positions), dtype=np.int64, count=len(positions))
            seg_text, seg_image = self._segments[segment]
            text[positions] = seg_text[rows]
            image[positions] = seg_image[rows]
        self.hits += len(keys)
        return text, image

    def add(self, keys: Sequence[str], text: np.ndarray, image: np.ndarray) -> None:
        """Rows computed by the teacher; counted as misses, written at the next flush."""
        self.misses += len(keys)
        self._pending.append((list(keys), np.asarray(text, np.float32), np.asarray(image, np.float32)))

    def flush(self) -> int:
        """Write this process's new rows as a segment of its own, then read every segment written
        since (collective with several processes: they meet at a barrier in between, and no rows
        travel between them); returns the number of rows this process added."""
        pending = self._pending
        self._pending = []
        self.reload()  # rows another rank or run wrote meanwhile need not be written twice
        added = self._write(pending)
        if self._stale_v1:
            self.legacy_path.unlink(missing_ok=True)
            self._stale_v1 = False
        if _distributed():
            dist.barrier()
        self.reload()
        return added

    def _write(self, pending: list[tuple[list[str], np.ndarray, np.ndarray]]) -> int:
        if not pending:
            return 0
        known = set(self._rows)
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
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "text": _fixed_list(texts, self.dim),
            "image": _fixed_list(images, self.dim),
        }, schema=schema)
        self.path.mkdir(parents=True, exist_ok=True)
        # unique without coordination: host and pid tell runs apart, rank and counter a run's writes
        # fields are separated by "-", so the host name keeps letters, digits and "_" only
        host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
        self._written += 1
        name = f"{time.time_ns():020d}-{host}-{os.getpid()}-r{_rank()}-{self._written:06d}{SEGMENT_SUFFIX}"
        target = self.path / name
        temporary = self.path / f".{name}.tmp"
        try:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                # one record batch: readers get single-chunk columns, viewed without copies
                writer.write_table(table.combine_chunks())
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
            _fsync_dir(self.path)  # the new name survives a power cut
        finally:
            temporary.unlink(missing_ok=True)
        return len(keys)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": len(self), "segments": len(self._segments), "hits": self.hits,
                "misses": self.misses}


def _fsync_dir(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is atomic
    finally:
        os.close(handle)


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    # one chunk (one record batch per segment): a view of the mapped file, no copy
    values = column.chunk(0).flatten() if column.num_chunks == 1 else column.combine_chunks().flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)  # flatten, not .values: honours an offset


def _fixed_list(matrix: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim)


def fsdp_requested() -> bool:
    """Whether this process runs under an FSDP launch (``accelerate launch`` with a config of
    ``distributed_type: FSDP``, e.g. deploy/accelerate/fsdp.yaml, exports ACCELERATE_USE_FSDP)
    with more than one process: then each frozen teacher is sharded across the ranks."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and _distributed()


def shard_teacher(encoder: TorchEncoder) -> int:
    """Shard a frozen teacher's weights over every rank with FSDP2 (``fully_shard``): each rank
    keeps 1/world of every parameter; a forward gathers one transformer layer at a time and
    frees it after (``reshard_after_forward``), so a rank holds its shard plus one layer.
    The teacher has no gradients and no optimizer state: nothing else is sharded or kept.
    Returns the parameters this rank holds. A forward is then collective: see ``Teacher.output``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    encoder.fingerprint  # noqa: B018  (hashed while the weights are whole, then cached)
    model = encoder.model
    mesh = init_device_mesh(encoder.device.type, (dist.get_world_size(),))
    total = sum(p.numel() for p in model.parameters())
    covered: set[int] = set()
    # every layer of every stack (vision and text towers, decoder): a ModuleList's children
    for stack in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for layer in stack:
            if any(True for _ in layer.parameters()) and id(layer) not in covered:
                fully_shard(layer, mesh=mesh, reshard_after_forward=True)
                covered.update(id(m) for m in layer.modules())
    # big tables outside the layers (the 8B's token embedding and its unused lm_head: 1.2B
    # parameters) get groups of their own, else the root group would gather them for the whole
    # forward; a weight tied to another module's (the 2B's lm_head) stays in the root group
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if (id(module) not in covered and isinstance(module, (torch.nn.Embedding, torch.nn.Linear))
                and sum(p.numel() for p in own) >= 0.01 * total and all(owners[id(p)] == 1 for p in own)):
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
            covered.add(id(module))
    # scalars (CLIP's logit scale and bias) cannot be sharded, and weigh nothing: kept whole
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=scalars or None)
    # dual encoders (CLIP, SigLIP) call these rather than forward(): they must gather the root's
    # own weights too. Qwen3-VL's encoder calls forward(), which itself calls get_image_features:
    # hooked, that inner call would free the root's weights halfway through the forward.
    if encoder.family != "qwen3_vl":
        for method in ("get_text_features", "get_image_features"):
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


@dataclass
class Teacher:
    """A frozen teacher in the ensemble: its encoder, weight and cache, and how often it ran."""

    encoder: TorchEncoder
    weight: float = 1.0
    cache: TeacherCache | None = None
    forward_rows: int = 0
    forward_calls: int = 0
    name: str = field(default="")
    #: sharded with FSDP (``shard_teacher``): every rank must run the same number of forwards
    sharded: bool = False
    #: parameters this rank holds (all of them unless sharded)
    local_parameters: int = 0

    def __post_init__(self) -> None:
        self.name = self.name or self.encoder.name
        self.encoder.model.eval().requires_grad_(False)

    def _forward_counts(self, text_chunks: int, image_chunks: int) -> tuple[int, int]:
        """How many text and image forwards this rank runs: its own, or, sharded, as many as the
        rank with the most cache misses (a sharded forward gathers weights from every rank, so
        every rank must call it alike: all text forwards, then all image forwards)."""
        if not self.sharded:
            return text_chunks, image_chunks
        counts = torch.tensor([text_chunks, image_chunks], dtype=torch.int64,
                              device=self.encoder.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        most_text, most_image = (int(v) for v in counts.tolist())
        return most_text, most_image

    def _padding_inputs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # one-row inputs for the extra forwards of a sharded teacher; their outputs are dropped
        from PIL import Image

        return self.encoder.tokenize(["NULL"]), self.encoder.preprocess([Image.new("RGB", (64, 64), "white")])

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
        text_chunks = list(inputs.text_chunks) if inputs is not None else []
        image_chunks = list(inputs.image_chunks) if inputs is not None else []
        most_text, most_image = self._forward_counts(len(text_chunks), len(image_chunks))
        if (most_text, most_image) != (len(text_chunks), len(image_chunks)):
            pad_text, pad_image = self._padding_inputs()
            text_chunks += [pad_text] * (most_text - len(text_chunks))
            image_chunks += [pad_image] * (most_image - len(image_chunks))
        text_out = [self.encoder.embed_text(chunk).float() for chunk in text_chunks]
        image_out = [self.encoder.embed_images(chunk).float() for chunk in image_chunks]
        if inputs is not None:
            new_text = torch.cat(text_out[:len(inputs.text_chunks)])
            new_image = torch.cat(image_out[:len(inputs.image_chunks)])
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
            "sharded": self.sharded, "local_parameters": self.local_parameters,
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
    shard: bool = False,
) -> list[Teacher]:
    """The frozen part of the ensemble: one ``Teacher`` per encoder, each with its weight
    (equal without ``weights``) and, when ``cache_dir`` is given, its cache there; ``shard``
    (several processes): each teacher's weights sharded across them (``shard_teacher``)."""
    if weights is not None and len(weights) != len(encoders):
        raise ValueError(f"teacher_weights has {len(weights)} entries for {len(encoders)} teachers; "
                         "give one weight per teacher")
    teachers = []
    for k, encoder in enumerate(encoders):
        cache = None
        if cache_dir is not None:
            cache = TeacherCache(cache_dir, fingerprint=encoder.fingerprint, dim=encoder.dim,
                                 logit_scale=float(encoder.logit_scale), teacher=encoder.name)
        # the fingerprint is taken before sharding: the fingerprint and the cache name the whole teacher
        local = shard_teacher(encoder) if shard else sum(p.numel() for p in encoder.model.parameters())
        teachers.append(Teacher(encoder, weight=float(weights[k]) if weights else 1.0, cache=cache,
                                name=names[k] if k < len(names) else encoder.name, sharded=shard,
                                local_parameters=local))
    return teachers


def cache_summary(teachers: Sequence[Teacher]) -> dict[str, int]:
    """Hits and misses over every teacher, for the report."""
    caches = [t.cache for t in teachers if t.cache is not None]
    return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
            "rows": sum(len(c) for c in caches)}
