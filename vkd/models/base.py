"""The one interface every stage talks to: an image-text ``Encoder``.

Two layers:

* ``Encoder`` — what indexing, search and evaluation need: ``encode_text`` and
  ``encode_images`` return L2-normalised float32 numpy arrays, batched, with an optional
  progress bar; plus ``dim``, ``name``, ``family`` and a ``fingerprint``.
* ``TorchEncoder`` — what training needs on top: ``tokenize``/``preprocess`` turn raw
  inputs into tensors, and ``embed_text``/``embed_images`` run a differentiable forward
  pass returning normalised embeddings. ``encode_*`` is the no-grad batched loop over
  them, so training and inference share one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

# DESIGN: a model without a learned logit scale multiplies cosine similarities by 1/0.05.
DEFAULT_LOGIT_SCALE = 1.0 / 0.05


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def load_rgb(image: Any, *, max_pixels: int | None = None) -> Image.Image:
    """An upright RGB PIL image from a PIL image or a path: the conversion the indexer uses
    (``vkd.data.images``: EXIF orientation, transparency on white, 16-bit and palette images).

    ``max_pixels`` is the decompression-bomb bound; None: the one in force (PIL's
    ``Image.MAX_IMAGE_PIXELS``, ~89.5 Mpx unless changed). Raises ``vkd.data.images.ImageError``
    (a ``ValueError``; ``ImageTooLarge`` over a bound) naming the file and what is wrong.
    """
    from vkd.data.images import load_image

    return load_image(image, max_pixels=max_pixels)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class Encoder(ABC):
    """Maps texts and images into one L2-normalised vector space."""

    name: str
    family: str
    dim: int
    batch_size: int = 32
    #: multiplier that turns cosine similarities into logits (CLIP: exp(logit_scale))
    logit_scale: float = DEFAULT_LOGIT_SCALE
    #: the system instruction of text inputs (queries) and of image inputs (documents); None
    #: for families that take no instruction (CLIP, SigLIP)
    query_instruction: str | None = None
    document_instruction: str | None = None

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Hash of the weights and the preprocessing: two encoders with the same
        fingerprint produce the same vectors (up to the precision they run in). A
        checkpoint's weights count as its weight files, so the dtype, device and backend
        (torch or its ONNX export) do not change it."""

    @abstractmethod
    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray: ...

    @abstractmethod
    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray: ...

    def encode_text(
        self,
        texts: Sequence[str] | str,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """float32 [n, dim], L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        return self._run(list(texts), self._encode_text_batch, batch_size, show_progress, "text")

    def encode_images(
        self,
        images: Sequence[Any] | Any,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """float32 [n, dim], L2-normalised. Accepts PIL images or paths."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self._run(list(images), self._encode_image_batch, batch_size, show_progress, "images")

    def _run(self, items, encode_batch, batch_size, show_progress, unit) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        size = batch_size or self.batch_size
        parts = []
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(items), desc=f"encode {unit}", unit=unit.rstrip("s"))
        for batch in batched(items, size):
            parts.append(np.asarray(encode_batch(batch), dtype=np.float32))
            if progress is not None:
                progress.update(len(batch))
        if progress is not None:
            progress.close()
        return l2_normalize(np.concatenate(parts, axis=0))

    def load_options(self) -> dict[str, Any]:
        """The ``load_encoder`` keyword options that, with ``name``, open an encoder giving these
        vectors (instructions, text limit, Matryoshka size ...); an index records them so that
        search encodes queries as the index was built. Empty when the name alone does."""
        return {}

    def describe(self) -> dict[str, Any]:
        info = {"name": self.name, "family": self.family, "dim": self.dim, "fingerprint": self.fingerprint,
                "options": self.load_options()}
        # A directory of random weights (vkd model tiny / random) says so wherever it is described.
        return {**info, **self.provenance()}

    def provenance(self) -> dict[str, Any]:
        """``weights`` ("random weights: arch X, not a trained model") and ``random`` (the
        record) when the model directory's ``vkd.json`` marks its weights random; else empty."""
        return self._provenance_of(self.name)

    def _provenance_of(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        # read once per directory: describe() runs per index build and per served search
        cache: dict[str, dict[str, Any]] = self.__dict__.setdefault("_provenance_cache", {})
        key = str(directory)
        if key not in cache:
            from vkd.models.provenance import provenance_summary

            cache[key] = provenance_summary(key)
        return cache[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, dim={self.dim})"


class TorchEncoder(Encoder):
    """An encoder backed by a torch ``nn.Module`` that training can update in place."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    source_dir: Path | None = None
    #: the checkpoint directory whose weight files ``model`` holds exactly (None once trained)
    weights_dir: Path | None = None
    _files_digest: str | None = None

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for ``texts`` (on CPU; ``embed_text`` moves them)."""

    @abstractmethod
    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Model inputs for ``images`` (PIL images or paths)."""

    @abstractmethod
    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write a plain model directory that ``load_encoder`` and ``from_pretrained`` open."""

    def provenance(self) -> dict[str, Any]:
        # The weights' own directory decides: weights changed in memory (training) have none,
        # and a saved copy of random weights carries the record along (keep_provenance).
        return self._provenance_of(self.weights_dir) if self.weights_dir is not None else {}

    def keep_provenance(self, out_dir: str | os.PathLike[str]) -> None:
        """Copy the weights' directory's ``vkd.json`` into ``out_dir`` while the weights are still
        exactly its files (a copy of random weights is as random); trained weights lose it.
        ``save`` calls this before linking the weights to their new files."""
        from vkd.models.provenance import PROVENANCE_FILE

        if self.weights_dir is None:
            return
        marker = self.weights_dir / PROVENANCE_FILE
        if marker.is_file() and Path(out_dir).resolve() != self.weights_dir:
            (Path(out_dir) / PROVENANCE_FILE).write_bytes(marker.read_bytes())

    def logit_scale_tensor(self) -> torch.Tensor:
        """The logit scale as a tensor for the training loss; models that learn one override
        this to return it differentiably."""
        import torch

        return torch.tensor(self.logit_scale, device=self.device)

    def embed_text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable: normalised float embeddings [n, dim]."""
        import torch.nn.functional as F

        return F.normalize(self._text_features(self._to_device(inputs)).float(), dim=-1)

    def embed_images(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return F.normalize(self._image_features(self._to_device(inputs)).float(), dim=-1)

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[key] = value
        return moved

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.embed_text(self.tokenize(texts)).float().cpu().numpy()

    def _encode_image_batch(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.embed_images(self.preprocess(images)).float().cpu().numpy()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def fingerprint(self) -> str:
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = self._fingerprint = self.compute_fingerprint()
        return cached

    def link_weights(self, directory: str | os.PathLike[str], files: Sequence[Path] | None = None) -> None:
        """Declare that ``self.model``'s weights are exactly those stored in ``directory``'s
        weight files (``files``; default: the safetensors there), so the fingerprint hashes
        the files, whatever dtype or device the tensors are in. Without weight files there
        the tensors are hashed instead."""
        from vkd.models.checkpoint import files_digest, weight_files

        directory = Path(directory).resolve()
        found = list(files) if files is not None else weight_files(directory)
        # Hashed now, not at the first fingerprint read: files rewritten after the load
        # must not lend their identity to the weights already in memory.
        self._files_digest = files_digest(directory, found) if found else None
        self.weights_dir = directory if found else None
        self._fingerprint = None

    def invalidate_fingerprint(self) -> None:
        """Call after the weights change (training): they no longer match any checkpoint
        files, so the next read hashes the tensors; ``save`` links them to files again."""
        self.weights_dir = self._files_digest = None
        self._fingerprint = None

    def preprocessing_config(self) -> dict[str, Any]:
        """What, besides the weights, decides the vectors (processor numbers, prompts)."""
        return {}

    def weights_identity(self) -> str:
        """The weights' part of the fingerprint: the checkpoint files' digest when the
        weights are a checkpoint's, else a digest of the tensors in memory."""
        if self._files_digest is not None:
            return "files:" + self._files_digest
        return "tensors:" + weights_digest(self.model)

    def compute_fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(
            {"family": self.family, "dim": self.dim, "pre": self.preprocessing_config()},
            sort_keys=True, default=str,
        ).encode())
        digest.update(self.weights_identity().encode())
        return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes).

    For weights that are no checkpoint's files (a model trained in memory): it costs a
    pass over the tensors and depends on their dtype, which is why checkpoints are
    identified by their files instead.
    """
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
