"""Qwen3-VL-Embedding backend: one chat-formatted input per item, last-token pooling.

The recipe (DESIGN.md, "Encoders") as the reference embedder applies it:

* a system turn holds the instruction (stripped, a final "." added when it ends without
  punctuation); the user turn holds the image, then the text; an input with neither
  becomes the text "NULL";
* queries and documents carry different instructions, as in the official evaluation: text
  (a query in every vkd use: search, training captions, evaluation) gets
  ``query_instruction`` (default ``DEFAULT_QUERY_INSTRUCTION``), anything with an image (a
  document: indexed images, an image used as a query too, so that an image searched for
  scores exactly against its own indexed vector) gets ``document_instruction`` (default
  "Represent the user's input.", the model's own default);
* the prompt string comes from the model's own chat template with the generation
  prompt, never from a hand-built string;
* length limits cut the user's text only, before the prompt is rendered: never the image
  tokens nor the template's closing tokens, so the last real token stays the template's
  end. ``max_text_length`` bounds the text's own tokens; ``max_length`` (the reference's
  8192) bounds the whole sequence, and an image that alone exceeds it is an error;
* images are resized here to multiples of 32 (patch 16 x merge 2) within
  ``min_pixels``..``max_pixels`` keeping the aspect ratio, and the image processor is
  called without resizing again; with ``image_buckets`` (``vkd.models.image_buckets``)
  each image is instead resized to the listed size nearest its aspect ratio, the policy
  of the ONNX export's fixed-size image graphs, so both backends give the same vectors;
* the embedding is the final (normed) hidden state of the last real token, found from
  the attention mask so either padding side works, L2-normalised; ``matryoshka_dim``
  keeps a prefix, normalised again.

``Qwen3VLProcessor`` needs a video processor and that needs torchvision, which vkd does
not depend on, so ``Qwen3VLEmbeddingProcessor`` below does the processor's part for
images and text only: resize, patchify (the PIL image processor), expand each
``<|image_pad|>`` to one token per merged patch, tokenize.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vkd.models.base import TorchEncoder, load_rgb
from vkd.models.image_buckets import Bucket, bucket_names, format_bucket, nearest_bucket, parse_buckets

DEFAULT_INSTRUCTION = "Represent the user's input."
#: The text-query instruction of the MTEB/MIEB image-text retrieval tasks (Flickr30k, COCO
#: text-to-image) on which Qwen3-VL-Embedding is evaluated; documents keep DEFAULT_INSTRUCTION.
DEFAULT_QUERY_INSTRUCTION = "Find an image that matches the given caption."
NULL_TEXT = "NULL"
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_LENGTH = 8192
# Qwen's resize refuses more extreme shapes; the vision tower never saw them in training.
MAX_ASPECT_RATIO = 200
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
# Written by ``save`` next to the model so that reopening restores the same options.
OPTIONS_FILE = "vkd_qwen3vl.json"

#: PEFT ``target_modules`` (suffix match) for LoRA on Qwen3-VL: the language model's
#: attention and MLP projections, and each vision block's attention (``attn.qkv``,
#: ``attn.proj``) and MLP (``mlp.linear_fc1/2``). The patch mergers (``merger.linear_fc*``)
#: and the patch embedding convolution are deliberately left out.
LORA_TARGET_MODULES: list[str] = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2",
]

def normalize_instruction(instruction: str | None, default: str = DEFAULT_INSTRUCTION) -> str:
    """The system-turn text: stripped, "." appended unless it ends in punctuation.

    ``None`` or a blank string means ``default``.
    """
    text = (instruction or "").strip()
    if not text:
        return default
    if not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


def smart_resize(
    height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the pixel count in bounds.

    Each side is rounded to the nearest multiple; when the area is then too large both
    sides are scaled down (rounded down), when too small scaled up (rounded up), by the
    same factor so the aspect ratio is kept as closely as the grid allows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height}: both sides must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image size {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}; crop or pad it first"
        )
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def build_conversation(text: str | None, image: bool, instruction: str | None = None) -> list[dict[str, Any]]:
    """The chat messages for one input: system = instruction, user = [image] [text]."""
    content: list[dict[str, Any]] = []
    if image:
        content.append({"type": "image"})
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        content.append({"type": "text", "text": NULL_TEXT})
    return [
        {"role": "system", "content": [{"type": "text", "text": normalize_instruction(instruction)}]},
        {"role": "user", "content": content},
    ]


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden_states[i, last position where attention_mask[i] is 1], any padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * (attention_mask != 0)).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last.to(hidden_states.device)]


def _pil_image_processor_class() -> type:
    try:  # transformers 5: the numpy/PIL backend, which needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor


class Qwen3VLEmbeddingProcessor:
    """Chat template + resize + image processor + tokenizer, for images and text."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        *,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        max_length: int = MAX_LENGTH,
        max_text_length: int | None = None,
        padding_side: str = "right",
        image_buckets: Sequence[Bucket] | str | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; Qwen3-VL-Embedding prompts come from it")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: choose 'left' or 'right'")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.max_length = int(max_length)
        if max_text_length is not None and int(max_text_length) < 1:
            raise ValueError(f"max_text_length={max_text_length}: must be at least 1 (or None: no limit of its own)")
        self.max_text_length = int(max_text_length) if max_text_length is not None else None
        self.padding_side = padding_side
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.factor = self.patch_size * self.merge_size
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}: need 0 < min_pixels <= max_pixels"
            )
        self.image_buckets = parse_buckets(image_buckets)
        for width, height in self.image_buckets or ():
            if width % self.factor or height % self.factor:
                raise ValueError(f"image bucket {width}x{height}: both sides must be multiples of {self.factor} "
                                 f"(patch {self.patch_size} x merge {self.merge_size})")
            if not self.min_pixels <= width * height <= self.max_pixels:
                raise ValueError(f"image bucket {width}x{height}: {width * height} pixels is outside "
                                 f"min_pixels..max_pixels = {self.min_pixels}..{self.max_pixels}")
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; batches of different lengths need one")

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; it is not a Qwen3-VL tokenizer")
        return int(token_id)

    def render(self, conversation: list[dict[str, Any]]) -> str:
        """The prompt string from the model's own chat template, with the generation prompt."""
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def resize(self, image: Any) -> Any:
        """The RGB image resized (bicubic) to ``smart_resize`` of its size, or with
        ``image_buckets`` to the bucket nearest its aspect ratio."""
        from PIL import Image

        image = load_rgb(image)
        if self.image_buckets:
            width, height = nearest_bucket(image.width, image.height, self.image_buckets)
        else:
            height, width = smart_resize(
                image.height, image.width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
            )
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=Image.Resampling.BICUBIC)

    def image_tokens(self, resized: Any) -> int:
        """Tokens one ``<|image_pad|>`` expands to for an image already ``resize``d."""
        return (resized.height // self.patch_size) * (resized.width // self.patch_size) // self.merge_size**2

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each string, tokenized alone as the prompt tokenizes it (no special tokens added)."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def cut_text(self, text: str, limit: int) -> str:
        """``text`` cut at a token boundary to at most ``limit`` tokens (tokenized alone).

        The cut is made in the string, before any prompt is rendered, so the prompt stays the
        chat template's own rendering of a (shorter) text.
        """
        if limit <= 0:
            return ""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= limit:
            return text
        # A byte-level token may end inside a character; re-tokenizing the cut then gives a
        # token more than counted, so step back until the cut fits.
        for keep in range(limit, 0, -1):
            cut = text[: offsets[keep - 1][1]]
            if self.count_tokens([cut])[0] <= limit:
                return cut
        return ""

    def __call__(self, prompts: Sequence[str], images: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
        """Model inputs for rendered prompts; ``images`` fill the image placeholders in order.

        Returns input_ids, attention_mask, mm_token_type_ids (1 on image tokens) and, when
        there are images, pixel_values and image_grid_thw.
        """
        placeholders = sum(prompt.count(IMAGE_TOKEN) for prompt in prompts)
        if placeholders != len(images):
            raise ValueError(f"{placeholders} image placeholders in the prompts but {len(images)} images")
        inputs: dict[str, torch.Tensor] = {}
        expected = [0] * len(prompts)
        if images:
            resized = [self.resize(image) for image in images]
            pixels = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
            grid = torch.as_tensor(pixels["image_grid_thw"])
            inputs["pixel_values"] = torch.as_tensor(pixels["pixel_values"])
            inputs["image_grid_thw"] = grid
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            expanded = []
            for row, prompt in enumerate(prompts):
                parts = prompt.split(IMAGE_TOKEN)
                text = parts[0]
                for part in parts[1:]:
                    count = next(counts)
                    expected[row] += count
                    text += IMAGE_TOKEN * count + part
                expanded.append(text)
            prompts = expanded
        # Qwen tokenizers add no BOS/EOS; saying so keeps other tokenizers from adding theirs.
        # No truncation here: cutting the sequence would cut image tokens or the template's
        # end (which last-token pooling reads); Qwen3VLEncoder.prepare cuts the text instead.
        encoded = self.tokenizer(
            list(prompts), add_special_tokens=False, padding=True, padding_side=self.padding_side,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"]
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        too_long = [(row, n) for row, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            row, n = too_long[0]
            raise ValueError(
                f"input {row} is {n} tokens long (of which {expected[row]} image tokens), over "
                f"max_length={self.max_length}; raise max_length or lower max_pixels"
            )
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        found = mm_token_type_ids.sum(dim=1).tolist()
        if found != expected:
            raise ValueError(f"image tokens per input {found} != {expected} expected")
        inputs.update(
            input_ids=input_ids, attention_mask=encoded["attention_mask"], mm_token_type_ids=mm_token_type_ids
        )
        return inputs

    def config(self) -> dict[str, Any]:
        processor = self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}
        keep = ("image_mean", "image_std", "rescale_factor", "patch_size", "merge_size", "temporal_patch_size")
        template = self.tokenizer.chat_template
        config: dict[str, Any] = {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "factor": self.factor,
            "max_length": self.max_length,
            "max_text_length": self.max_text_length,
            "image": {key: processor.get(key) for key in keep},
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
            "vocab_size": len(self.tokenizer),
        }
        if self.image_buckets:
            # only when set: fingerprints of encoders without buckets stay what they were
            config["image_buckets"] = [format_bucket(bucket) for bucket in self.image_buckets]
        return config


Item = tuple[Any, "str | None"]


class Qwen3VLEncoder(TorchEncoder):
    """Qwen3-VL-Embedding (or any ``qwen3_vl`` model) as an image-text ``Encoder``."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Qwen3VLEmbeddingProcessor,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 32,
        instruction: str | None = None,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        matryoshka_dim: int | None = None,
        source_dir: Path | None = None,
    ) -> None:
        """``instruction`` sets both roles at once; ``query_instruction`` (text) and
        ``document_instruction`` (anything with an image) override it per role."""
        self.model = model
        self.processor = processor
        self.name = name
        self.family = model.config.model_type
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.source_dir = source_dir
        self.query_instruction = normalize_instruction(query_instruction or instruction, DEFAULT_QUERY_INSTRUCTION)
        self.document_instruction = normalize_instruction(document_instruction or instruction, DEFAULT_INSTRUCTION)
        vision = model.config.vision_config
        model_sizes = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        processor_sizes = (processor.patch_size, processor.merge_size, processor.image_processor.temporal_patch_size)
        if tuple(model_sizes) != tuple(processor_sizes):
            raise ValueError(
                f"{name}: preprocessor_config.json (patch, merge, temporal patch) = {processor_sizes} but "
                f"config.json vision_config has {model_sizes}; they must match"
            )
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        if matryoshka_dim is not None and not 1 <= int(matryoshka_dim) <= self.hidden_size:
            raise ValueError(
                f"{name}: matryoshka_dim={matryoshka_dim} is outside 1..{self.hidden_size} (the hidden size)"
            )
        self.matryoshka_dim = int(matryoshka_dim) if matryoshka_dim is not None else None
        self.dim = self.matryoshka_dim or self.hidden_size
        self._fingerprint = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        instruction: str | None = None,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        matryoshka_dim: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_length: int | None = None,
        max_text_length: int | None = None,
        padding_side: str | None = None,
        image_buckets: Sequence[Any] | str | None = None,
    ) -> Qwen3VLEncoder:
        """Open a Qwen3-VL directory or hub id; options not given fall back to what
        ``save`` recorded there, then to the reference defaults. ``instruction`` sets the
        query and the document instruction together. Pickle weights (pytorch_model.bin) are
        refused unless ``allow_pickle``: unpickling can run code."""
        from transformers import AutoTokenizer, Qwen3VLModel

        from vkd.models.checkpoint import check_weights_format, checkpoint_weights, resolve_model_name

        name = resolve_model_name(name_or_path)
        check_weights_format(name, allow_pickle=allow_pickle)
        saved = _saved_options(name)
        # An explicit `instruction` (both roles) outranks saved per-role ones; a directory saved
        # before per-role instructions existed holds one "instruction" for both.
        options = {
            "query_instruction": _first(query_instruction, instruction, saved.get("query_instruction"),
                                        saved.get("instruction")),
            "document_instruction": _first(document_instruction, instruction, saved.get("document_instruction"),
                                           saved.get("instruction")),
            "matryoshka_dim": matryoshka_dim if matryoshka_dim is not None else saved.get("matryoshka_dim"),
            "min_pixels": min_pixels if min_pixels is not None else saved.get("min_pixels", MIN_PIXELS),
            "max_pixels": max_pixels if max_pixels is not None else saved.get("max_pixels", MAX_PIXELS),
            "max_length": max_length if max_length is not None else saved.get("max_length", MAX_LENGTH),
            "max_text_length": max_text_length if max_text_length is not None else saved.get("max_text_length"),
            "padding_side": padding_side if padding_side is not None else saved.get("padding_side", "right"),
            "image_buckets": image_buckets if image_buckets is not None else saved.get("image_buckets"),
        }
        # The embedding needs the base model only: a ForConditionalGeneration checkpoint
        # loads into it with its lm_head left out.
        model, info = Qwen3VLModel.from_pretrained(
            name, dtype=dtype, use_safetensors=None if allow_pickle else True, output_loading_info=True
        )
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{name}: {len(missing)} weights of Qwen3VLModel are not in the checkpoint "
                f"(e.g. {', '.join(missing[:3])}); expected a Qwen3-VL checkpoint"
            )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _find_chat_template(name)
        image_processor = _pil_image_processor_class().from_pretrained(name)
        processor = Qwen3VLEmbeddingProcessor(
            tokenizer, image_processor, min_pixels=options["min_pixels"], max_pixels=options["max_pixels"],
            max_length=options["max_length"], max_text_length=options["max_text_length"],
            padding_side=options["padding_side"], image_buckets=options["image_buckets"],
        )
        device = torch.device(device)
        model.to(device).eval()
        encoder = cls(
            model, processor, name=name, device=device, dtype=dtype, batch_size=batch_size,
            query_instruction=options["query_instruction"], document_instruction=options["document_instruction"],
            matryoshka_dim=options["matryoshka_dim"],
            source_dir=Path(name) if Path(name).is_dir() else None,
        )
        # Missing weights raised above, so the files determine the model; the lm_head a
        # ForConditionalGeneration checkpoint also holds is left out of the model but
        # stays in the files' hash, which only makes the identity stricter.
        checkpoint = checkpoint_weights(name, allow_pickle=allow_pickle)
        if checkpoint is not None:
            encoder.link_weights(*checkpoint)
        return encoder

    # Qwen3-VL-Embedding learns no logit scale: the inherited 1/0.05 (DEFAULT_LOGIT_SCALE) applies.

    # -- inputs -----------------------------------------------------------------------

    def prompt(self, text: str | None = None, image: bool = False, instruction: str | None = None) -> str:
        """The chat-formatted string for one input (one ``<|image_pad|>`` per image, before
        expansion to the image's token count). Without ``instruction``, an input with an
        image is a document (``document_instruction``), text alone a query (``query_instruction``)."""
        default = self.document_instruction if image else self.query_instruction
        return self.processor.render(build_conversation(text, image, instruction or default))

    def prepare(self, items: Sequence[Item], instruction: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for (image or None, text or None) items; texts over the limits are cut
        (see the module docstring), images never."""
        images = [self.processor.resize(image) if image is not None else None for image, _ in items]
        texts = self._fit_texts(images, [text for _, text in items], instruction)
        prompts = [self.prompt(text, image is not None, instruction) for image, text in zip(images, texts, strict=True)]
        return self.processor(prompts, [image for image in images if image is not None])

    def _fit_texts(self, images: Sequence[Any], texts: Sequence[str | None],
                   instruction: str | None) -> list[str | None]:
        processor = self.processor
        fitted = list(texts)
        if processor.max_text_length is not None:
            fitted = [processor.cut_text(text, processor.max_text_length) if text else text for text in fitted]
        for row, (image, text) in enumerate(zip(images, fitted, strict=True)):
            image_tokens = processor.image_tokens(image) if image is not None else 0
            while True:
                prompt = self.prompt(text, image is not None, instruction)
                # A byte-level token covers at least one byte, so the common short prompt is
                # known to fit without tokenizing it; the processor checks the real count anyway.
                if len(prompt.encode("utf-8")) + image_tokens <= processor.max_length:
                    break
                length = processor.count_tokens([prompt])[0] - (1 if image is not None else 0) + image_tokens
                excess = length - processor.max_length
                if excess <= 0:
                    break
                if not text:
                    raise ValueError(
                        f"input {row} needs {length} tokens ({image_tokens} of them image tokens) without any "
                        f"text, over max_length={processor.max_length}; raise max_length or lower max_pixels"
                    )
                text = processor.cut_text(text, processor.count_tokens([text])[0] - excess)
            fitted[row] = text
        return fitted

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.prepare([(None, text) for text in texts])

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.prepare([(image, None) for image in images])

    # -- forward ----------------------------------------------------------------------

    def last_hidden_state(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The language model's final normed hidden states [n, seq, hidden]."""
        inputs = dict(inputs)
        if "pixel_values" not in inputs:
            # Text only: the model would number positions 0..L-1 over the padding too;
            # counting real tokens instead gives left padding the same positions as right.
            mask = inputs["attention_mask"]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = positions.unsqueeze(0).expand(3, -1, -1)
        return self.model(**inputs, use_cache=False).last_hidden_state

    def _features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = last_token_pool(self.last_hidden_state(inputs), inputs["attention_mask"])
        if self.matryoshka_dim is not None:
            pooled = pooled[:, : self.matryoshka_dim]
        return pooled

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._features(inputs)

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._features(inputs)

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable: normalised embeddings [n, dim] for any ``prepare`` output."""
        import torch.nn.functional as F

        return F.normalize(self._features(self._to_device(inputs)).float(), dim=-1)

    def encode_multimodal(
        self,
        images: Sequence[Any],
        texts: Sequence[str | None],
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """float32 [n, dim] for (image, text) pairs; either side of a pair may be None."""
        if len(images) != len(texts):
            raise ValueError(f"encode_multimodal: {len(images)} images but {len(texts)} texts")
        return self._run(list(zip(images, texts, strict=True)), self._encode_item_batch, batch_size, show_progress, "inputs")

    def _encode_item_batch(self, items: Sequence[Item]) -> np.ndarray:
        with torch.inference_mode():
            return self.embed(self.prepare(items)).float().cpu().numpy()

    # -- identity and persistence -----------------------------------------------------

    def load_options(self) -> dict[str, Any]:
        # padding_side is left out: it does not change the vectors (see last_token_pool).
        return {
            "query_instruction": self.query_instruction,
            "document_instruction": self.document_instruction,
            "matryoshka_dim": self.matryoshka_dim,
            "min_pixels": self.processor.min_pixels,
            "max_pixels": self.processor.max_pixels,
            "max_length": self.processor.max_length,
            "max_text_length": self.processor.max_text_length,
            # one "WxH,WxH" string: index manifests record options as JSON scalars, and
            # load_encoder(prefer="onnx") compares it with the export's as recorded
            "image_buckets": ",".join(bucket_names(self.processor.image_buckets) or []) or None,
        }

    def options(self) -> dict[str, Any]:
        """Everything ``save`` records for ``from_pretrained`` to restore."""
        return {**self.load_options(), "padding_side": self.processor.padding_side}

    def preprocessing_config(self) -> dict[str, Any]:
        # padding_side is left out: it does not change the vectors (see last_token_pool).
        return {
            "query_instruction": self.query_instruction, "document_instruction": self.document_instruction,
            "matryoshka_dim": self.matryoshka_dim, **self.processor.config(),
        }

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.processor.tokenizer.save_pretrained(out)
        self.processor.image_processor.save_pretrained(out)
        (out / OPTIONS_FILE).write_text(json.dumps(self.options(), indent=2) + "\n")
        self.keep_provenance(out)
        self.link_weights(out)
        return out


def _first(*values: Any) -> Any:
    """The first value that is not None (None when all are)."""
    return next((value for value in values if value is not None), None)


def _saved_options(name: str) -> dict[str, Any]:
    path = Path(name) / OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it to use the defaults") from error
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected a JSON object of encoder options")
    return options


def _find_chat_template(name: str) -> str:
    """The chat template from the processor files when the tokenizer config has none."""
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        text = Path(path).read_text()
        return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    raise ValueError(
        f"{name}: no chat template (looked in tokenizer_config.json, chat_template.jinja and "
        "chat_template.json); Qwen3-VL-Embedding prompts come from the model's own template"
    )
