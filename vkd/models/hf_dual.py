"""Dual-encoder backend: CLIP, SigLIP and any transformers model with
``get_text_features`` / ``get_image_features``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vkd.models.base import DEFAULT_LOGIT_SCALE, TorchEncoder, load_rgb

# Families whose text tower was trained on fixed-length padded input: their pooled token
# sits at a fixed position, so batch padding must be to max_length, exactly as in training.
PAD_TO_MAX_LENGTH = {"siglip", "siglip2"}

# Families trained on lowercased text. SigLIP's own tokenizer lowercases (do_lower_case), but
# SigLIP 2's hub checkpoints ship a Gemma tokenizer that keeps case (transformers before 5.2
# loads it as such), and a SigLIP checkpoint may ship one too. Lowercasing here is idempotent
# where the tokenizer lowercases as well, so the rule is by family alone: the vectors never
# depend on which tokenizer class a transformers version picked.
LOWERCASE_TEXT = {"siglip", "siglip2"}

# CLIP's convention: exp(logit_scale) is capped at 100 so the temperature cannot run away.
MAX_LOGIT_SCALE = 100.0

# Image inputs of get_image_features besides pixel_values: SigLIP 2 (NaFlex) takes a patch mask
# and each image's patch grid.
_EXTRA_IMAGE_INPUTS = ("pixel_attention_mask", "spatial_shapes")


class HFDualEncoder(TorchEncoder):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 32,
        max_text_length: int | None = None,
        source_dir: Path | None = None,
    ) -> None:
        for method in ("get_text_features", "get_image_features"):
            if not hasattr(model, method):
                raise ValueError(f"{name}: model class {type(model).__name__} has no {method}()")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.family = model.config.model_type
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.source_dir = source_dir
        text_config = getattr(model.config, "text_config", model.config)
        positions = getattr(text_config, "max_position_embeddings", None)
        if max_text_length is not None and positions is not None and int(max_text_length) > int(positions):
            # SigLIP pads every text to this length, CLIP would index past its position table:
            # either way the text tower cannot take it.
            raise ValueError(f"{name}: max_text_length={max_text_length} exceeds the text tower's "
                             f"{positions} positions; give at most {positions}, or none for the model's own limit")
        self.max_text_length = int(max_text_length or positions or 77)
        self.pad_to_max_length = self.family in PAD_TO_MAX_LENGTH
        self.lowercase_text = self.family in LOWERCASE_TEXT
        self.dim = int(getattr(model.config, "projection_dim", 0) or text_config.hidden_size)
        scale = getattr(model, "logit_scale", None)
        # The cap never sits below the scale the model starts from (pretrained SigLIP: ~117):
        # a clamp below it would replace the learned scale and stop its gradient at step 0.
        # Computed as logit_scale_tensor computes it, so the start is inside the cap exactly.
        self.max_logit_scale = MAX_LOGIT_SCALE
        if scale is not None:
            self.max_logit_scale = max(MAX_LOGIT_SCALE, float(scale.detach().float().exp()))
        self._fingerprint = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        max_text_length: int | None = None,
        instruction: str | None = None,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
    ) -> HFDualEncoder:
        """Open a model directory or hub id. Pickle weights (pytorch_model.bin) are refused
        unless ``allow_pickle``: unpickling can run code.

        CLIP and SigLIP take no instruction: ``instruction``, ``query_instruction`` and
        ``document_instruction`` are accepted, so that one set of options opens a model of
        any family, and ignored; they change neither the vectors nor the fingerprint."""
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from vkd.models.checkpoint import check_weights_format, checkpoint_weights, resolve_model_name

        name = resolve_model_name(name_or_path)
        check_weights_format(name, allow_pickle=allow_pickle)
        # use_safetensors=None lets transformers fall back to the .bin files allowed here.
        model, info = AutoModel.from_pretrained(
            name, dtype=dtype, use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        model.to(device).eval()
        source = Path(name) if Path(name).is_dir() else None
        encoder = cls(
            model, tokenizer, image_processor, name=name, device=device, dtype=dtype,
            batch_size=batch_size, max_text_length=max_text_length, source_dir=source,
        )
        # Weights the checkpoint lacks are freshly (randomly) initialised: the files then
        # do not determine the model, so it keeps the tensor hash.
        checkpoint = checkpoint_weights(name, allow_pickle=allow_pickle)
        if checkpoint is not None and not info.get("missing_keys"):
            encoder.link_weights(*checkpoint)
        return encoder

    @property
    def logit_scale(self) -> float:  # type: ignore[override]
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().float().exp()) if scale is not None else DEFAULT_LOGIT_SCALE

    def logit_scale_tensor(self) -> torch.Tensor:
        """exp(logit_scale) as a tensor, differentiable when the model learns it."""
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return super().logit_scale_tensor()
        return scale.float().exp().clamp(max=self.max_logit_scale)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [text.lower() for text in texts] if self.lowercase_text else list(texts)
        encoded = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return dict(encoded)

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=[load_rgb(image) for image in images], return_tensors="pt")
        inputs = {"pixel_values": pixels["pixel_values"]}
        inputs.update({key: pixels[key] for key in _EXTRA_IMAGE_INPUTS if key in pixels})
        return inputs

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**inputs))

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_image_features(**inputs))

    def load_options(self) -> dict[str, Any]:
        return {"max_text_length": self.max_text_length}

    def preprocessing_config(self) -> dict[str, Any]:
        processor = self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}
        keep = ("size", "crop_size", "image_mean", "image_std", "do_center_crop", "resample", "rescale_factor")
        image = {key: processor.get(key) for key in keep}
        # SigLIP 2 sizes images by patch budget instead; listed only where set, so that the
        # fingerprints of the other families stay as they were
        image.update({key: processor[key] for key in ("patch_size", "max_num_patches")
                      if processor.get(key) is not None})
        config = {
            "image": image,
            "max_text_length": self.max_text_length,
            "pad_to_max_length": self.pad_to_max_length,
            "vocab_size": len(self.tokenizer),
        }
        if self.lowercase_text:
            # only where it applies, so CLIP fingerprints (and the indexes that record them) stay
            config["lowercase_text"] = True
        return config

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.lowercase_text:
            info["text_preprocessing"] = (f"lowercased before tokenizing ({self.family} was trained on "
                                          "lowercased text; its hub tokenizer may keep case)")
        return info

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        self.keep_provenance(out)
        self.link_weights(out)
        return out


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object; 4.x returned the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"feature method returned {type(output).__name__} without pooler_output")
    return pooled
