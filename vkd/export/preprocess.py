"""Torch-free input preparation for the ONNX backend: ``tokenizers`` + numpy + PIL.

Both classes reproduce what the torch path feeds the model, number for number:

* ``TextTokenizer`` loads the ``tokenizer.json`` the torch tokenizer runs on and applies
  the same truncation, padding (SigLIP: to ``max_length``) and, for chat-formatted models
  (Qwen3-VL-Embedding), the prompt the model's chat template renders around the text.
* ``ImagePreprocessor`` reads a ``preprocessor_config.json`` of the CLIP / SigLIP kind and
  applies resize (PIL, same filter and the same size arithmetic as transformers), center
  crop, rescale and normalise, with transformers' dtypes (float64 rescale, float32 out).
* ``BucketImagePreprocessor`` does Qwen3-VL's part for a bucketed export: the image resized
  (bicubic) to the bucket nearest its aspect ratio, as the torch encoder does under the same
  ``image_buckets``, then rescaled and normalised; the patchifying happens in the graph.

The export's parity check runs these against the torch encoder, so any drift shows up as
a failed export rather than as quietly worse search results.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vkd.models.base import load_rgb
from vkd.models.image_buckets import Bucket, nearest_bucket, parse_buckets

# Image processors whose steps ImagePreprocessor reproduces (transformers names, without
# the "Fast"/"Pil" backend suffix).
SUPPORTED_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
# Keys that change the pixels; anything else in a config is bookkeeping.
_PIXEL_KEYS = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad",
}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def processor_type(config: dict[str, Any]) -> str:
    name = str(config.get("image_processor_type", ""))
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


class ImagePreprocessor:
    """numpy/PIL twin of transformers' CLIP and SigLIP image processors (PIL backend)."""

    def __init__(self, config: dict[str, Any], *, source: str = "preprocessor_config.json") -> None:
        kind = processor_type(config)
        if kind not in SUPPORTED_IMAGE_PROCESSORS:
            raise ValueError(
                f"{source}: image_processor_type {config.get('image_processor_type')!r} is not reproduced by the "
                f"ONNX backend; supported: {', '.join(SUPPORTED_IMAGE_PROCESSORS)}"
            )
        if config.get("do_pad"):
            raise ValueError(f"{source}: do_pad=true is not supported by the ONNX backend; expected false")
        self.source = source
        self.do_resize = bool(config.get("do_resize", True))
        self.size = dict(config.get("size") or {})
        self.resample = int(config.get("resample", 3))
        self.do_center_crop = bool(config.get("do_center_crop", False))
        self.crop_size = dict(config.get("crop_size") or {})
        self.do_rescale = bool(config.get("do_rescale", True))
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(config.get("do_normalize", True))
        self.mean = np.asarray(config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.std = np.asarray(config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        if self.do_resize:
            keys = {key for key, value in self.size.items() if value is not None}
            if keys not in ({"shortest_edge"}, {"height", "width"}):
                raise ValueError(
                    f"{source}: size={self.size} is not supported by the ONNX backend; expected "
                    "{'shortest_edge': N} or {'height': H, 'width': W}"
                )
        if self.do_center_crop and not {"height", "width"} <= set(self.crop_size):
            raise ValueError(f"{source}: crop_size={self.crop_size}; expected {{'height': H, 'width': W}}")
        if self.mean.shape != (3,) or self.std.shape != (3,):
            raise ValueError(f"{source}: image_mean and image_std must have 3 values (RGB)")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ImagePreprocessor:
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read the image preprocessing config ({error})") from error
        return cls(config, source=str(path))

    def _resize_to(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            # transformers' get_resize_output_image_size(default_to_square=False)
            target = int(self.size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            return (new_long, target) if width <= height else (target, new_long)
        return int(self.size["height"]), int(self.size["width"])

    def _center_crop(self, pixels: np.ndarray) -> np.ndarray:
        # transformers' center_crop on HWC uint8, including its zero padding of small images
        crop_h, crop_w = int(self.crop_size["height"]), int(self.crop_size["width"])
        height, width = pixels.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
            return pixels[top : top + crop_h, left : left + crop_w]
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
        top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
        padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
        top, left = top + top_pad, left + left_pad
        return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]

    def one(self, image: Any) -> np.ndarray:
        """float32 [3, H, W] for one PIL image or path."""
        image = load_rgb(image)
        if self.do_resize:
            height, width = self._resize_to(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = self._center_crop(pixels)
        out = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        out = np.asarray(out, dtype=np.float32)
        if self.do_normalize:
            out = (out - self.mean) / self.std
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        """float32 [n, 3, H, W]."""
        arrays = [self.one(image) for image in images]
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{self.source}: images came out in different sizes {sorted(shapes)}; "
                             "the config must resize or crop to one size")
        return np.stack(arrays)


def _rescale_normalize(pixels: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """uint8 HWC -> float32 CHW with transformers' numerics (float64 rescale, float32 out)."""
    out = pixels.astype(np.float64) * float(config.get("rescale_factor", 1 / 255)) \
        if config.get("do_rescale", True) else pixels
    out = np.asarray(out, dtype=np.float32)
    if config.get("do_normalize", True):
        mean = np.asarray(config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        std = np.asarray(config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class BucketImagePreprocessor:
    """Images to float32 [3, H, W] at the bucket nearest each one's aspect ratio.

    ``config``: ``buckets`` (["WxH", ...]), ``resample`` (PIL filter id, 3 = bicubic, what
    Qwen3-VL's resize uses), ``do_rescale``, ``rescale_factor``, ``do_normalize``,
    ``image_mean``, ``image_std``.
    """

    def __init__(self, config: dict[str, Any], *, source: str = "export.json") -> None:
        buckets = parse_buckets(config.get("buckets"))
        if not buckets:
            raise ValueError(f"{source}: a bucketed image tower lists no buckets")
        self.buckets: tuple[Bucket, ...] = buckets
        self.config = dict(config)
        self.resample = int(config.get("resample", 3))
        self.source = source

    def bucket_of(self, image: Any) -> Bucket:
        return nearest_bucket(image.width, image.height, self.buckets)

    def one(self, image: Any, bucket: Bucket | None = None) -> np.ndarray:
        """float32 [3, H, W] for one PIL image or path, resized to ``bucket`` (default: its nearest)."""
        image = load_rgb(image)
        width, height = bucket or self.bucket_of(image)
        if image.size != (width, height):
            image = image.resize((width, height), resample=self.resample)
        return _rescale_normalize(np.asarray(image), self.config)

    def group(self, images: Sequence[Any]) -> dict[Bucket, tuple[list[int], np.ndarray]]:
        """{bucket: (positions in ``images``, float32 [n, 3, H, W])}, in bucket order."""
        loaded = [load_rgb(image) for image in images]
        positions: dict[Bucket, list[int]] = {}
        for position, image in enumerate(loaded):
            positions.setdefault(self.bucket_of(image), []).append(position)
        return {
            bucket: (rows, np.stack([self.one(loaded[row], bucket) for row in rows]))
            for bucket in self.buckets if (rows := positions.get(bucket))
        }


class TextTokenizer:
    """The torch path's tokenization, from ``tokenizer.json`` and the export's text config.

    ``config`` keys: ``max_length``, ``padding`` ("longest" or "max_length"),
    ``padding_side``, ``truncation_side``, ``pad_id``, ``pad_token``,
    ``add_special_tokens``, ``inputs`` (which of input_ids / attention_mask /
    token_type_ids the model takes), ``lowercase`` (SigLIP families: lowercase the text
    first, as ``HFDualEncoder.tokenize`` does) and ``template``: ``None`` or
    ``{"prefix", "suffix", "empty_text", "max_text_tokens"}`` for chat-formatted models, whose
    text is cut to ``max_text_tokens`` (tokenized alone, at a token boundary) before the prompt
    is built, as the torch path does: the prompt's closing tokens are never cut.
    """

    def __init__(self, tokenizer_file: str | os.PathLike[str], config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.max_length = int(config["max_length"])
        self.inputs = tuple(config.get("inputs", ("input_ids", "attention_mask")))
        unknown = set(self.inputs) - set(TEXT_INPUTS)
        if unknown:
            raise ValueError(f"{tokenizer_file}: text inputs {sorted(unknown)} unknown; expected some of {TEXT_INPUTS}")
        self.add_special_tokens = bool(config.get("add_special_tokens", True))
        self.lowercase = bool(config.get("lowercase", False))
        self.template = config.get("template")
        limit = (self.template or {}).get("max_text_tokens")
        self.max_text_tokens = int(limit) if limit is not None else None
        # A second, unconfigured copy counts the text's own tokens (the first one truncates and
        # pads); it is only read, so concurrent searches can share it too.
        self._counter = Tokenizer.from_file(str(tokenizer_file)) if self.max_text_tokens is not None else None
        padding = config.get("padding", "longest")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"{tokenizer_file}: padding={padding!r}; expected 'longest' or 'max_length'")
        # Configured once here: encode_batch then only reads the tokenizer, so concurrent
        # searches can share it.
        self.tokenizer.enable_truncation(
            self.max_length, direction=config.get("truncation_side", "right"), strategy="longest_first"
        )
        self.tokenizer.enable_padding(
            direction=config.get("padding_side", "right"),
            pad_id=int(config["pad_id"]),
            pad_token=str(config["pad_token"]),
            length=self.max_length if padding == "max_length" else None,
        )

    def cut_text(self, text: str) -> str:
        """``text`` cut to ``max_text_tokens`` tokens at a token boundary (as
        ``Qwen3VLEmbeddingProcessor.cut_text``)."""
        if self._counter is None or self.max_text_tokens is None:
            return text
        limit = self.max_text_tokens
        encoding = self._counter.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= limit:
            return text
        for keep in range(limit, 0, -1):  # a byte-level token may end inside a character
            cut = text[: encoding.offsets[keep - 1][1]]
            if len(self._counter.encode(cut, add_special_tokens=False).ids) <= limit:
                return cut
        return ""

    def render(self, text: str) -> str:
        if self.template is None:
            return text
        text = self.cut_text(text)
        return f"{self.template['prefix']}{text or self.template.get('empty_text', '')}{self.template['suffix']}"

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if self.lowercase:
            texts = [text.lower() for text in texts]
        encodings = self.tokenizer.encode_batch(
            [self.render(text) for text in texts], add_special_tokens=self.add_special_tokens
        )
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {
            name: np.asarray([getattr(encoding, fields[name]) for encoding in encodings], dtype=np.int64)
            for name in self.inputs
        }
