"""``load_encoder``: name or path in, the right backend out.

The family is read from the model's own ``config.json`` (``model_type``), so one name
works for a local directory, a hub id or a directory that training wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vkd.models.base import Encoder

# model_type -> backend. Every family here is tested on a tiny random model of its class.
DUAL_ENCODER_TYPES = ("clip", "siglip", "siglip2")
QWEN3_VL_TYPES = ("qwen3_vl",)
SUPPORTED_FAMILIES = {
    **{t: "dual" for t in DUAL_ENCODER_TYPES},
    **{t: "qwen3-vl" for t in QWEN3_VL_TYPES},
}
ONNX_MANIFEST = Path("onnx") / "export.json"
ONNX_RUNTIME_OPTIONS = ("precision", "threads", "providers")


def _read_config(name_or_path: str, trust_remote_code: bool) -> dict[str, Any]:
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(name_or_path).exists():
        raise ValueError(
            f"{name_or_path}: no config.json here; expected a model directory written by "
            "save_pretrained (or `vkd distill`, `vkd model tiny`)"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).to_dict()
    except OSError as error:
        # transformers' message names neither the model nor the two places it looked
        offline = " (HF_HUB_OFFLINE is set: the hub is not asked)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ValueError(
            f"{name_or_path}: no such model directory here, and no hub model of that id could be loaded{offline}; "
            "give a model directory (written by save_pretrained, `vkd distill` or `vkd model tiny`) or a hub id "
            "such as openai/clip-vit-base-patch32"
        ) from error


def detect_family(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> str:
    """"dual" or "qwen3-vl"; a clear error for anything else."""
    config = _read_config(str(name_or_path), trust_remote_code)
    model_type = config.get("model_type", "")
    if config.get("auto_map") and not trust_remote_code:
        # Loading such a model with the built-in class instead would quietly compute
        # something other than what its authors wrote; running their code is opt-in.
        raise ValueError(
            f"{name_or_path}: config.json names custom model code (auto_map: "
            f"{', '.join(sorted(config['auto_map']))}), and vkd runs no code from a checkpoint by default. "
            "Pass load_encoder(..., trust_remote_code=True) only if you trust its source."
        )
    if model_type in SUPPORTED_FAMILIES:
        return SUPPORTED_FAMILIES[model_type]
    if trust_remote_code and config.get("auto_map"):
        return "dual"  # remote-code dual encoders are checked for the feature methods on load
    raise ValueError(
        f"{name_or_path}: model_type {model_type!r} is not supported. Supported: "
        f"{', '.join(sorted(SUPPORTED_FAMILIES))} (CLIP, SigLIP and SigLIP2 dual encoders; "
        "Qwen3-VL-Embedding). Models with get_text_features/get_image_features that need "
        "custom code load with trust_remote_code=True."
    )


def default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: Any, device: Any) -> Any:
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, str):
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    return dtype


def load_encoder(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | Any | None = None,
    dtype: str | Any | None = None,
    batch_size: int = 32,
    prefer: str = "torch",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    space: str = "student",
    **backend_options: Any,
) -> Encoder:
    """Load an image-text encoder from a local directory or hub id.

    ``prefer="onnx"`` uses the ONNX export in ``<dir>/onnx`` when there is one (no torch
    needed then). ``device`` defaults to CUDA when available, ``dtype`` to bf16 on CUDA and
    float32 on CPU. Extra keyword options go to the backend and belong to this model only:
    ``max_text_length`` (every family: the text's own token limit; Qwen3-VL counts the user's
    text only, never image or template tokens); Qwen3-VL also ``query_instruction`` (text
    inputs, default "Find an image that matches the given caption."),
    ``document_instruction`` (inputs with an image, default "Represent the user's input."),
    ``instruction`` (both), ``matryoshka_dim``, ``min_pixels``, ``max_pixels``,
    ``max_length``. CLIP/SigLIP accept the instruction options and ignore them. With
    ``prefer="onnx"`` the export is used only if it was made with the options given
    (``precision``, ``threads``, ``providers`` go to the ONNX encoder); otherwise the torch
    model applies them.

    The encoder's ``name`` is a local directory's absolute path (a hub id stays an id), so
    whatever records it opens the same model from any working directory. Nothing from the
    checkpoint runs as code unless asked: ``trust_remote_code`` enables a model's own code,
    ``allow_pickle`` weights stored only as pickle (pytorch_model.bin).

    ``space``: ``"student"`` (the model's own vectors), or ``"teacher"`` / ``"teacher:<fingerprint>"``:
    the vectors mapped into the teacher's space by the projection a distilled model directory
    carries (``vkd.models.projection``; torch and ONNX backends alike), for the asymmetric search
    modes. ``ProjectionError`` when the model carries none, or one into another teacher's space.
    """
    from vkd.models.checkpoint import resolve_model_name
    from vkd.models.projection import STUDENT_SPACE, check_space

    name = resolve_model_name(name_or_path)
    if check_space(space) != STUDENT_SPACE:
        from vkd.models.projection import ProjectedEncoder, projection_for

        projection = projection_for(name, space)  # before loading anything: a missing one fails fast
        base = load_encoder(name, device=device, dtype=dtype, batch_size=batch_size, prefer=prefer,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, **backend_options)
        return ProjectedEncoder(base, projection)
    if prefer not in ("torch", "onnx"):
        raise ValueError(f"prefer={prefer!r}: choose 'torch' or 'onnx'")
    if prefer == "onnx" and (Path(name) / ONNX_MANIFEST).is_file():
        from vkd.export.onnx_encoder import OnnxEncoder

        runtime = {key: backend_options.pop(key) for key in ONNX_RUNTIME_OPTIONS if key in backend_options}
        onnx = OnnxEncoder(Path(name) / "onnx", batch_size=batch_size, **runtime)
        made_with = onnx.load_options()
        # The export's preprocessing is fixed: it serves only a request for what it was made
        # with (an index records the options its vectors were made with, instructions included).
        if all(value is None or made_with.get(key) == value for key, value in backend_options.items()):
            return onnx

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown our own progress bars
    family = detect_family(name, trust_remote_code=trust_remote_code)
    device = torch.device(device) if device is not None else default_device()
    dtype = _resolve_dtype(dtype, device)
    if family == "qwen3-vl":
        from vkd.models.qwen3vl import Qwen3VLEncoder

        return Qwen3VLEncoder.from_pretrained(
            name, device=device, dtype=dtype, batch_size=batch_size,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, **backend_options,
        )
    from vkd.models.hf_dual import HFDualEncoder

    return HFDualEncoder.from_pretrained(
        name, device=device, dtype=dtype, batch_size=batch_size,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, **backend_options,
    )
