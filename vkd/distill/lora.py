"""LoRA on the student through peft: which layers, what else trains, and the merge.

Targets (``lora_target_modules``; a name matches a module whose dotted path ends with it):

* CLIP / SigLIP: every attention projection and MLP layer of both towers' encoder layers
  (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``).
* Qwen3-VL: ``vkd.models.qwen3vl.LORA_TARGET_MODULES`` (language model and vision blocks).

Matches that LoRA cannot serve are excluded: layers inside a projection head (trained in
full, below) and the ``out_proj`` of an ``nn.MultiheadAttention`` (SigLIP's pooling head),
which that module reads as a raw weight, so an unmerged adapter there would be ignored while
the merged one would not.

Projection heads (CLIP ``text_projection``/``visual_projection``, SigLIP ``text_model.head``/
``vision_model.head``) train in full as peft ``modules_to_save``, so they are stored in the
adapter and ``base model + adapter`` reproduces the merged student exactly. The logit scale
(and SigLIP's logit bias) stays frozen at the student's pretrained value under LoRA: it is a
bare parameter that a peft adapter cannot carry (``modules_to_save`` takes modules only), and
training it anyway would make ``base model + adapter`` differ from the merged student, so the
adapter would silently load a different model. A pretrained student's scale is already the
one its embeddings were trained for; the run summary says it stayed frozen. Full fine-tuning
(``use_lora: false``) trains it too.

The adapter's ``base_model_name_or_path`` is the base as an absolute path when it is a local
directory (a hub id stays an id), so the adapter loads from any working directory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import PeftModel

    from vkd.models.base import TorchEncoder

DUAL_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
HEAD_MODULES = {
    "clip": ["text_projection", "visual_projection"],
    "siglip": ["text_model.head", "vision_model.head"],
    "siglip2": ["text_model.head", "vision_model.head"],
}


def default_target_modules(encoder: TorchEncoder) -> list[str]:
    if encoder.family == "qwen3_vl":
        from vkd.models.qwen3vl import LORA_TARGET_MODULES

        return list(LORA_TARGET_MODULES)
    return list(DUAL_TARGET_MODULES)


def head_modules(encoder: TorchEncoder) -> list[str]:
    """The projection heads of ``encoder`` that exist in its model."""
    names = dict(encoder.model.named_modules())
    return [name for name in HEAD_MODULES.get(encoder.family, []) if name in names]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: torch.nn.Module, targets: Sequence[str], heads: Sequence[str]) -> list[str]:
    """Full names of matched modules LoRA must leave alone (see the module docstring).

    Raises ``ValueError`` naming a target that matches no linear layer.
    """
    modules = dict(model.named_modules())
    linear = {name for name, module in modules.items() if isinstance(module, torch.nn.Linear)}
    excluded = []
    for target in targets:
        matched = [name for name in linear if _matches(name, target)]
        if not matched:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ValueError(
                f"lora_target_modules: {target!r} matches no linear layer of {type(model).__name__}; "
                f"linear layers end in: {', '.join(suffixes)}"
            )
        for name in matched:
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            in_head = any(name.startswith(head + ".") for head in heads)
            if in_head or isinstance(parent, torch.nn.MultiheadAttention):
                excluded.append(name)
    return sorted(excluded)


def apply_lora(
    encoder: TorchEncoder,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | None = None,
    base_name: str | None = None,
) -> PeftModel:
    """Inject LoRA adapters into ``encoder.model`` in place; returns the ``PeftModel`` that
    saves and merges them. ``encoder`` keeps working as before, now through the adapters."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else default_target_modules(encoder)
    heads = head_modules(encoder)
    excluded = resolve_targets(encoder.model, targets, heads)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        exclude_modules=excluded or None, modules_to_save=heads or None, bias="none",
    )
    from vkd.models.checkpoint import resolve_model_name

    with warnings.catch_warnings():
        # peft 0.21 (PeftModel.__init__) reads ``model.is_gradient_checkpointing``, which
        # transformers 5 deprecated in favour of ``is_activation_checkpointing`` with a
        # FutureWarning on every read; the value is the same, so only that warning is hidden.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        peft_model = get_peft_model(encoder.model, config)
    # As given, a relative directory would only load from the run's working directory.
    peft_model.peft_config["default"].base_model_name_or_path = resolve_model_name(base_name or encoder.name)
    encoder.invalidate_fingerprint()
    return peft_model


def save_adapter(peft_model: PeftModel, out_dir: str | os.PathLike[str]) -> Path:
    """PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def merge(encoder: TorchEncoder, peft_model: PeftModel) -> None:
    """Fold the adapters and trained heads into plain weights; ``encoder.model`` becomes the
    ordinary model class again, ready for ``encoder.save``."""
    encoder.model = peft_model.merge_and_unload()
    encoder.invalidate_fingerprint()
