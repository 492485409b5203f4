"""Export a student's towers to ONNX (fp32 + INT8) and prove the copies honest.

``export_onnx(model_dir)`` writes, into ``model_dir/onnx`` by default::

    text.onnx  text.int8.onnx  image.onnx  image.int8.onnx
    tokenizer.json  preprocessor_config.json  export.json

A graph whose weights exceed the 2 GiB protobuf limit (``max_single_file_bytes``) keeps them
in ``name.onnx.data`` beside it (``vkd.export.layout``; fp32 and INT8 alike); ``export.json``
lists those files per graph and records every graph file's size and sha256.

Qwen3-VL-Embedding's image side has no fixed shape (see ``vkd.export.qwen_image``); with
``image_buckets`` it is exported as one vision graph per image size, ``image-448x448.onnx``
(+ ``.int8.onnx``) and so on, ending at the language model's inputs, and one language model
graph they all share, ``image-language-model.onnx`` (its sequence axis dynamic; at 2B it is
1.4 B of the 1.8 B parameters an image runs through, so five buckets store it once, not five
times). ``export.json`` records the buckets and the policy that resizes every image into the
one nearest its aspect ratio. Each INT8 copy is chosen against torch with its partner graph
in fp32; the image side's INT8 gate is both INT8 copies in a row. The torch model is loaded with the
same ``image_buckets`` (an encoder option, part of its fingerprint), so vectors from either
backend match; an index built with the torch model *without* buckets holds other image
vectors and another fingerprint (build it with ``image_buckets`` to search it with the export).

Each tower is a small ``nn.Module`` around the encoder's own differentiable forward
(``embed_text`` / ``embed_images``, normalisation included), so the graph computes exactly
what the torch backend computes. The legacy TorchScript exporter (``dynamo=False``) is
used: it takes ``dynamic_axes`` for the batch and sequence axes directly and exports
these models in well under a second, where the torch.export-based exporter took ~15 s on
a tiny CLIP and produced a graph ONNX Runtime refused to load (duplicate output name).

The parity check encodes sample texts and images with the torch encoder and with
``OnnxEncoder`` over the new files — tokenizer, preprocessing and all — and requires
cosine >= 0.9999 (fp32) and >= 0.99 (INT8) on every sample. Only then does the export
replace ``out_dir``; otherwise ``ExportError`` carries the numbers and nothing is left.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vkd.export.int8 import (
    DEFAULT_CANDIDATES,
    INT8_TARGET_COSINE,
    RECIPES,
    attention_shape,
    get_recipe,
    op_counts,
    quantize_int8,
    quiet_quantizer,
)
from vkd.export.layout import (
    SINGLE_FILE_MAX_BYTES,
    data_file,
    graph_bytes,
    move_graph,
    relayout,
    remove_graph,
)
from vkd.export.onnx_encoder import EXPORT_FORMAT, EXPORT_MANIFEST, LANGUAGE_MODEL, OnnxEncoder
from vkd.export.preprocess import TEXT_INPUTS, BucketImagePreprocessor, ImagePreprocessor
from vkd.models.base import load_rgb
from vkd.models.image_buckets import (
    BUCKET_POLICY,
    DEFAULT_BUCKET_PIXELS,
    DEFAULT_BUCKET_RATIOS,
    Bucket,
    bucket_names,
    buckets_for_ratios,
    format_bucket,
    parse_buckets,
)

if TYPE_CHECKING:
    from PIL import Image

    from vkd.models.base import TorchEncoder

PARITY_MIN_COSINE = {"fp32": 0.9999, "int8": 0.99}
INT8_MODES = ("dynamic", "static", "none")
DEFAULT_OPSET = 17
# what the TorchScript exporter accepts (SDPA needs 14)
MIN_OPSET, MAX_OPSET = 14, 20
# Sample inputs of the parity check: lengths from empty to past any max_length, unicode,
# odd casing; images small, large, extreme aspect ratios, grey and with alpha.
SAMPLE_TEXTS = [
    "a dog on a beach",
    "A RED CAR parked near the lake at night",
    "two small cats sitting on a blue sofa next to a window",
    "",
    "café crème, s'il vous plaît 🐶",
    "sky",
    "a child playing with a yellow ball in a green field on a sunny day, photo",
    " ".join(["a very long caption that keeps going"] * 20),
    "white boat under a bridge",
    "bird flying over the sea",
    "man and woman walking in the snow",
    "close up of a flower",
]
_TEMPLATE_SENTINEL = "<<vkd:text>>"


class ExportError(RuntimeError):
    """The export could not be written or failed its parity check; the message says why."""


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def parity(self) -> dict[str, Any]:
        return self.manifest["parity"]


def sample_images(n: int = 8, seed: int = 0) -> list[Image.Image]:
    """Deterministic synthetic images of assorted sizes, aspect ratios and modes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(40, 32), (32, 40), (96, 64), (90, 17), (20, 20), (64, 64), (50, 70), (33, 33)]
    images = []
    for index in range(n):
        width, height = sizes[index % len(sizes)]
        if index % 4 == 1:  # smooth gradients resample differently from noise
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                               (x + y) * 127 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
        else:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if index % 4 == 2:
            image = image.convert("L")
        elif index % 4 == 3:
            image = image.convert("RGBA")
        images.append(image)
    return images


# -- tower specs -------------------------------------------------------------------------


def _text_spec(encoder: TorchEncoder) -> tuple[Any, dict[str, Any]]:
    """(HF tokenizer, the text config OnnxEncoder's TextTokenizer reproduces it from)."""
    from vkd.models.hf_dual import HFDualEncoder

    if isinstance(encoder, HFDualEncoder):
        tokenizer = encoder.tokenizer
        spec = {
            "max_length": int(encoder.max_text_length),
            "padding": "max_length" if encoder.pad_to_max_length else "longest",
            "add_special_tokens": True,
            "template": None,
        }
        if encoder.lowercase_text:  # SigLIP: the text is lowercased before the tokenizer sees it
            spec["lowercase"] = True
    elif type(encoder).__name__ == "Qwen3VLEncoder":
        tokenizer = encoder.processor.tokenizer
        spec = {
            "max_length": int(encoder.processor.max_length),
            "padding": "longest",
            "padding_side": encoder.processor.padding_side,
            "add_special_tokens": False,
            "template": _chat_template_parts(encoder),
        }
    else:
        raise ExportError(
            f"{encoder.name}: {type(encoder).__name__} has no ONNX export; supported: CLIP/SigLIP dual "
            "encoders (both towers) and Qwen3-VL-Embedding (text tower)"
        )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"{encoder.name}: the tokenizer ({type(tokenizer).__name__}) is not backed by the "
                          "`tokenizers` library, which the ONNX backend runs on")
    if tokenizer.pad_token_id is None:
        raise ExportError(f"{encoder.name}: the tokenizer has no pad token; batches need one")
    sample = encoder.tokenize(SAMPLE_TEXTS[:2])
    spec.setdefault("padding_side", tokenizer.padding_side)
    spec.update(
        tokenizer="tokenizer.json",
        truncation_side=tokenizer.truncation_side,
        pad_id=int(tokenizer.pad_token_id),
        pad_token=str(tokenizer.pad_token),
        inputs=[name for name in sample if name in TEXT_INPUTS],
    )
    return tokenizer, spec


def _chat_template_parts(encoder: Any) -> dict[str, str]:
    """The chat template's rendering split around the text, checked to be a plain wrap.

    OnnxEncoder then needs no jinja at run time: prompt = prefix + text + suffix.
    """
    from vkd.models.qwen3vl import NULL_TEXT

    rendered = encoder.prompt(_TEMPLATE_SENTINEL)
    if rendered.count(_TEMPLATE_SENTINEL) != 1:
        raise ExportError(f"{encoder.name}: the chat template does not place the text verbatim once")
    prefix, suffix = rendered.split(_TEMPLATE_SENTINEL)
    # The torch path cuts the text, never the template, to its own limit and to what the
    # whole-sequence bound leaves beside the prompt.
    processor = encoder.processor
    room = processor.max_length - sum(processor.count_tokens([prefix, suffix]))
    limit = room if processor.max_text_length is None else min(processor.max_text_length, room)
    parts = {"prefix": prefix, "suffix": suffix, "empty_text": NULL_TEXT, "max_text_tokens": limit}
    for text in SAMPLE_TEXTS:
        expected = encoder.prompt(text or None)
        if expected != prefix + (text or NULL_TEXT) + suffix:
            raise ExportError(
                f"{encoder.name}: the chat template renders {text!r} as something other than "
                "prefix + text + suffix; the ONNX backend cannot reproduce this template"
            )
    return parts


def _image_spec(encoder: TorchEncoder, buckets: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(preprocessor config, None) when the image tower can be exported, else (None, why).

    A bucketed (Qwen3-VL) export's config is ``{"kind": "buckets", ...}``."""
    from vkd.models.hf_dual import HFDualEncoder

    if not isinstance(encoder, HFDualEncoder):
        image_buckets = getattr(getattr(encoder, "processor", None), "image_buckets", None)
        if buckets and image_buckets:
            processor = encoder.processor.image_processor.to_dict()
            keep = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
            return {"kind": "buckets", "buckets": list(image_buckets),
                    "preprocess": {"resample": 3, **{key: processor.get(key) for key in keep}}}, None
        return None, (
            f"{type(encoder).__name__}'s image input is a variable-size patch grid with per-image rotary "
            "positions and image-token expansion, which one ONNX graph cannot carry; only the text tower was "
            "exported. Export one graph per fixed image size with image_buckets='default' (CLI: "
            "--image-buckets default), which resizes every image to the nearest of a few sizes"
        )
    config = encoder.image_processor.to_dict()
    try:
        ImagePreprocessor(config, source=f"{encoder.name}/preprocessor_config.json")
    except ValueError as error:
        return None, str(error)
    return config, None


# -- export --------------------------------------------------------------------------------


@contextlib.contextmanager
def _explicit_attention(model: Any) -> Iterator[int]:
    """While exporting, each ``nn.MultiheadAttention`` of ``model`` (SigLIP's attention-pooling
    head) computes through separate q/k/v ``Linear`` layers instead of its packed in-projection.

    The packed weight is sliced at bounds traced from the input's shape, so in the graph the
    key/value projection (over every patch) is a MatMul whose weight is not a constant, which
    dynamic INT8 leaves in fp32; as three Linears it is a constant weight it quantises. Yields
    how many modules were replaced; they are restored afterwards (the parity check compares
    the graph with the untouched model)."""
    import torch

    replaced: list[tuple[Any, str, Any]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention) and _ExplicitAttention.supports(child):
                replaced.append((parent, name, child))
                setattr(parent, name, _ExplicitAttention(child))
    try:
        yield len(replaced)
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)


class _ExplicitAttention:
    """Factory of the explicit twin of a batch-first ``nn.MultiheadAttention`` (a class so the
    torch import stays inside the export)."""

    @staticmethod
    def supports(module: Any) -> bool:
        return bool(module.batch_first and module._qkv_same_embed_dim and module.in_proj_bias is not None
                    and module.bias_k is None and not module.add_zero_attn and not module.training)

    def __new__(cls, module: Any) -> Any:  # type: ignore[misc]
        import torch
        import torch.nn.functional as F

        class ExplicitAttention(torch.nn.Module):
            def __init__(self, mha: Any) -> None:
                super().__init__()
                dim, self.heads = int(mha.embed_dim), int(mha.num_heads)
                weight, bias = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
                self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
                for index, linear in enumerate((self.q, self.k, self.v)):
                    linear.weight = torch.nn.Parameter(weight[index * dim : (index + 1) * dim].clone())
                    linear.bias = torch.nn.Parameter(bias[index * dim : (index + 1) * dim].clone())
                self.out_proj = mha.out_proj
                self.original = mha

            def forward(self, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> tuple[Any, None]:
                if args or any(kwargs.get(name) is not None for name in ("key_padding_mask", "attn_mask")):
                    return self.original(query, key, value, *args, **kwargs)
                head_dim = query.shape[-1] // self.heads

                def split(x: Any) -> Any:
                    return x.reshape(x.shape[0], -1, self.heads, head_dim).transpose(1, 2)

                out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)), split(self.v(value)))
                out = out.transpose(1, 2).reshape(query.shape[0], -1, self.heads * head_dim)
                return self.out_proj(out), None

        return ExplicitAttention(module)


def _tower_modules(encoder: TorchEncoder, text_inputs: Sequence[str]) -> tuple[Any, Any]:
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = encoder.model  # registered so its weights become initializers

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return encoder.embed_text(dict(zip(text_inputs, tensors, strict=True)))

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = encoder.model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return encoder.embed_images({"pixel_values": pixel_values})

    return TextTower().eval(), ImageTower().eval()


def _torch_export(module: Any, args: tuple[Any, ...], path: Path, input_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int,
                  max_single_bytes: int = SINGLE_FILE_MAX_BYTES,
                  outputs: dict[str, dict[int, str]] | None = None) -> None:
    """Export ``module`` to ``path`` (+ its data file over ``max_single_bytes``); ``outputs``:
    output names and their dynamic axes (default: one "embedding" [batch, dim])."""
    # Into a folder of its own: over 2 GiB the exporter writes one external file per tensor,
    # named after the tensor, and two graphs of one model share tensor names.
    scratch = path.with_name(f".torch-{path.name}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        _torch_export_raw(module, args, scratch / path.name, input_names, dynamic_axes, opset,
                          outputs or {"embedding": {0: "batch"}})
        relayout(scratch / path.name, path, max_single_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _torch_export_raw(module: Any, args: tuple[Any, ...], path: Path, input_names: list[str],
                      dynamic_axes: dict[str, dict[int, str]], opset: int,
                      outputs: dict[str, dict[int, str]]) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python-side shape checks are expected: the traced inputs
        # are padded batches, so the general (masked) path is what gets recorded.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=list(outputs),
                dynamic_axes={**dynamic_axes, **outputs}, opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
        except Exception as error:  # the exporter raises many types; all mean this tower failed
            raise ExportError(f"{path.name}: torch.onnx.export (opset {opset}) failed: {type(error).__name__}: "
                              f"{error}. Opsets {MIN_OPSET}-{MAX_OPSET} are supported; {DEFAULT_OPSET} is tested") from error


def _quantize_static(fp32: Path, int8: Path, feeds: list[dict[str, np.ndarray]],
                     max_single_bytes: int = SINGLE_FILE_MAX_BYTES) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with quiet_quantizer():
        # Matrix products only: QDQ around the attention mask's Add (whose constants are
        # near float32's minimum) leaves a text tower at cosine ~0.05; the products are
        # where the time goes anyway.
        quantize_static(fp32, int8, FeedReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"],
                        use_external_data_format=graph_bytes(fp32) > max_single_bytes)
    relayout(int8, int8, max_single_bytes)


def _load_calibration(path: str | os.PathLike[str], limit: int) -> tuple[list[str], list[Path]]:
    from vkd.data.pairs import read_pairs

    pairs = read_pairs(path)
    texts = list(dict.fromkeys(pairs.texts()))[:limit]
    images = pairs.images()[:limit]
    if not texts:
        raise ExportError(f"{path}: no pairs to calibrate on")
    return texts, images


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    # unrounded: a rounded 0.99995 would pass a 0.9999 bound the true value fails
    cos = np.sum(reference.astype(np.float64) * candidate.astype(np.float64), axis=1)
    return {"min": float(cos.min()), "mean": float(cos.mean()), "n": int(cos.size)}


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished export into place; an older export there is replaced only now."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)


def export_onnx(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    int8: str = "dynamic",
    calibration: str | os.PathLike[str] | None = None,
    calibration_size: int = 64,
    opset: int = DEFAULT_OPSET,
    image_buckets: str | Sequence[Any] | None = None,
    int8_recipe: str | None = None,
    max_single_file_bytes: int = SINGLE_FILE_MAX_BYTES,
    **load_options: Any,
) -> ExportResult:
    """Export ``model_dir``'s towers to ONNX with an INT8 copy and a parity check.

    ``int8``: "dynamic" (weights INT8, activations quantised on the fly; the fast CPU
    choice), "static" (QDQ, activations calibrated on ``calibration``'s texts and images)
    or "none". Dynamic INT8 tries ``vkd.export.int8.DEFAULT_CANDIDATES`` per graph, fastest
    first, and keeps the first within ``INT8_TARGET_COSINE`` (0.999) of torch;
    ``int8_recipe`` names one recipe of ``vkd.export.int8.RECIPES`` to use instead. ``calibration`` is a pairs.jsonl; its first ``calibration_size`` texts and
    images also join the parity samples. ``load_options`` go to ``load_encoder`` (e.g.
    Qwen3-VL's ``instruction``). Raises ``ExportError`` with the numbers when a copy is not
    within the parity bounds; ``out_dir`` (default ``model_dir/onnx``) is then untouched.

    ``image_buckets`` (Qwen3-VL only): None exports the image side for the buckets the model
    was saved with, if any (else the text tower alone); "default" for ``DEFAULT_BUCKETS``;
    "WxH,WxH" or a list for those sizes; "none" for the text tower alone.

    ``max_single_file_bytes``: a graph whose tensors total more is written as ``name.onnx`` +
    ``name.onnx.data`` (external data, ``vkd.export.layout``), fp32 and INT8 alike; the
    default keeps every graph under the 2 GiB protobuf limit a single file. Tests lower it
    to put a tiny model's weights in external data.
    """
    from vkd.models import load_encoder

    if int8 not in INT8_MODES:
        raise ExportError(f"int8={int8!r}: choose one of {', '.join(INT8_MODES)}")
    if int8 == "static" and calibration is None:
        raise ExportError("int8='static' calibrates activations on real inputs: pass calibration=pairs.jsonl "
                          "(CLI: --calibration), or use int8='dynamic'")
    if int8_recipe is not None:
        if int8 != "dynamic":
            raise ExportError(f"int8_recipe={int8_recipe!r} is a dynamic INT8 recipe; it needs int8='dynamic'")
        try:
            get_recipe(int8_recipe)
        except ValueError as error:
            raise ExportError(str(error)) from error
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    if out.exists() and not (out / EXPORT_MANIFEST).is_file() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not an ONNX export (no {EXPORT_MANIFEST}); choose another out_dir")
    calib_texts, calib_images = _load_calibration(calibration, calibration_size) if calibration else ([], [])
    export_buckets = _resolve_buckets(model_dir, image_buckets, load_options)

    started = time.perf_counter()
    try:
        encoder = load_encoder(model_dir, device="cpu", dtype="float32", prefer="torch", **load_options)
    except (OSError, ValueError) as error:
        raise ExportError(f"{model_dir}: cannot load the model to export ({error})") from error
    tokenizer, text_spec = _text_spec(encoder)
    image_config, image_unsupported = _image_spec(encoder, export_buckets)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _write_export(
            encoder, staging, tokenizer, text_spec, image_config, image_unsupported,
            int8=int8, int8_recipe=int8_recipe, opset=opset, calib_texts=calib_texts, calib_images=calib_images,
            max_single_bytes=max_single_file_bytes,
        )
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, manifest)


#: The default image buckets of a Qwen3-VL export (width x height): 1:1, 4:3, 3:4, 16:9 and
#: 9:16 at about 448 x 448 pixels, each side rounded to a multiple of 32 as Qwen's resize does.
DEFAULT_BUCKETS: tuple[Bucket, ...] = buckets_for_ratios(DEFAULT_BUCKET_PIXELS, DEFAULT_BUCKET_RATIOS)


def _resolve_buckets(model_dir: Path, image_buckets: str | Sequence[Any] | None,
                     load_options: dict[str, Any]) -> bool:
    """Put the requested buckets into ``load_options``; whether the image side is to be exported
    for buckets (None: for the ones the model was saved with, if any)."""
    if image_buckets is None:
        return True
    if isinstance(image_buckets, str) and image_buckets.strip().lower() == "none":
        return False
    from vkd.models.registry import detect_family

    try:
        family = detect_family(model_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"{model_dir}: cannot load the model to export ({error})") from error
    if family != "qwen3-vl":
        raise ExportError(f"{model_dir}: image buckets are for Qwen3-VL models, whose image size varies; this "
                          "model's image tower already has one fixed input size")
    if isinstance(image_buckets, str) and image_buckets.strip().lower() == "default":
        buckets = DEFAULT_BUCKETS
    else:
        try:
            buckets = parse_buckets(image_buckets) or ()
        except ValueError as error:
            raise ExportError(str(error)) from error
        if not buckets:
            raise ExportError(f"image_buckets={image_buckets!r}: no buckets given; use 'default', 'none' or WxH,WxH")
    ratios: dict[float, Bucket] = {}
    for bucket in buckets:
        ratio = round(bucket[0] / bucket[1], 6)
        if ratio in ratios:
            # nearest-aspect-ratio routing would never pick the second one
            raise ExportError(f"image buckets {format_bucket(ratios[ratio])} and {format_bucket(bucket)} have the "
                              "same aspect ratio; images go to the bucket nearest their aspect ratio, so keep one")
        ratios[ratio] = bucket
    load_options["image_buckets"] = ",".join(bucket_names(buckets) or [])
    return True


def _write_export(
    encoder: TorchEncoder,
    staging: Path,
    tokenizer: Any,
    text_spec: dict[str, Any],
    image_config: dict[str, Any] | None,
    image_unsupported: str | None,
    *,
    int8: str,
    int8_recipe: str | None = None,
    opset: int,
    calib_texts: list[str],
    calib_images: list[Path],
    max_single_bytes: int = SINGLE_FILE_MAX_BYTES,
) -> dict[str, Any]:
    import vkd

    (staging / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
    if image_config is not None and image_config.get("kind") != "buckets":
        (staging / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, default=str) + "\n")

    text_inputs = list(text_spec["inputs"])
    text_module, image_module = _tower_modules(encoder, text_inputs)
    # Two texts of different lengths: the traced batch is padded, so the graph keeps the
    # attention-mask path rather than a shortcut taken only for unpadded input.
    traced = encoder.tokenize(["a photo of a dog running on the beach", "a cat"])
    _torch_export(text_module, tuple(traced[name] for name in text_inputs), staging / "text.onnx", text_inputs,
                  {name: {0: "batch", 1: "sequence"} for name in text_inputs}, opset, max_single_bytes)
    towers: dict[str, Any] = {"text": {"fp32": "text.onnx", "int8": None, **text_spec}, "image": None}
    if image_config is not None and image_config.get("kind") == "buckets":
        towers["image"] = _export_buckets(encoder, staging, image_config, opset, max_single_bytes)
    elif image_config is not None:
        pixels = encoder.preprocess(sample_images(2))["pixel_values"]
        with _explicit_attention(encoder.model):
            _torch_export(image_module, (pixels,), staging / "image.onnx", ["pixel_values"],
                          {"pixel_values": {0: "batch"}}, opset, max_single_bytes)
        towers["image"] = {"fp32": "image.onnx", "int8": None, "preprocessor": "preprocessor_config.json"}

    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "vkd_version": vkd.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "name": str(encoder.name),
            "family": encoder.family,
            "fingerprint": encoder.fingerprint,
            "dim": int(encoder.dim),
            "logit_scale": float(encoder.logit_scale),
            "backend": type(encoder).__name__,
            # what load_encoder(..., prefer="onnx") compares a request's options with
            "options": encoder.load_options(),
        },
        "exporter": "torch.onnx (TorchScript, dynamo=False)",
        "opset": opset,
        "quantization": int8,
        **towers,
        "image_unsupported": image_unsupported,
    }
    # export.json goes in first so OnnxEncoder can read the staging dir for calibration
    # feeds and for the parity check.
    (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    samples = _parity_samples(manifest, calib_texts, calib_images)
    reference = _torch_reference(encoder, samples)
    # Everything from here on reads the ONNX graphs, and onnxruntime's quantizer holds ~3.6x a
    # graph's bytes (11.8 GB for a 3.3 GB graph): the torch weights go now, not at the end.
    _release_torch_weights(encoder)
    int8_parity: dict[str, dict[str, Any]] = {}
    if int8 != "none":
        fp32_encoder = OnnxEncoder(staging, precision="fp32", batch_size=4)
        for tower, part, entry in _graphs(manifest):
            int8_name = entry["fp32"].replace(".onnx", ".int8.onnx")
            key = tower if part is None else f"image {part if isinstance(part, str) else format_bucket(part)}"
            # A bucket's graph is measured through the fp32 language model, the language model
            # on the fp32 bucket graphs' outputs: each copy's own error, against torch.
            run = _graph_run(fp32_encoder, tower, part, samples)
            if int8 == "static":
                calibration = _calibration_feeds(fp32_encoder, tower, calib_texts, calib_images, part=part)
                _quantize_static(staging / entry["fp32"], staging / int8_name, calibration, max_single_bytes)
                entry["int8_recipe"] = "static"
                int8_parity[key] = _graph_cosines(staging / int8_name, run, reference[tower])
            else:
                entry["int8_recipe"], entry["int8_tried"], int8_parity[key] = _choose_recipe(
                    encoder, staging, "text" if part == LANGUAGE_MODEL else tower, entry["fp32"], int8_name, run,
                    reference[tower], [int8_recipe] if int8_recipe else list(DEFAULT_CANDIDATES), max_single_bytes,
                )
            entry["int8"] = int8_name
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shared = fp32_encoder.shares_language_model
        del fp32_encoder  # its sessions hold the fp32 weights; the checks below open their own
        if shared:
            # what a user runs is both INT8 copies in a row: that is the image side's INT8 figure
            for key in [key for key in int8_parity if key.startswith("image ")]:
                manifest["image"].setdefault("int8_alone", {})[key.removeprefix("image ")] = int8_parity.pop(key)
            int8_parity.update(_chained_int8_parity(staging, samples, reference))

    manifest["parity"] = parity = _parity(staging, manifest, samples, reference, int8_parity)
    manifest["files"] = _record_files(staging, manifest)
    checked = [(tower, numbers) for tower, numbers in parity["towers"].items()]
    checked += [(f"image {size}", numbers) for size, numbers in parity.get("image_buckets", {}).items()]
    failures = [
        f"{tower} {precision}: min cosine {numbers['min']:.6f} < {PARITY_MIN_COSINE[precision]} "
        f"(mean {numbers['mean']:.6f}, {numbers['n']} samples)"
        for tower, by_precision in checked
        for precision, numbers in by_precision.items()
        if numbers["min"] < PARITY_MIN_COSINE[precision]
    ]
    if failures:
        raise ExportError(
            f"{encoder.name}: the ONNX export does not reproduce the torch model: " + "; ".join(failures)
            + ". Nothing was written. Try --int8 dynamic (or none) if INT8 failed; an fp32 failure means "
            "the graph or the preprocessing differs from the torch path — please report it."
        )
    return manifest


def _record_files(staging: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per graph entry, its external-data file names (``"data"``) and bytes on disk with them
    (``"bytes"``); returns every file's size and sha256 for the manifest's ``"files"``, which
    readers without the onnx package (the slim server) check an export against."""
    from vkd.models.checkpoint import sha256_file

    files: dict[str, dict[str, Any]] = {}
    for _tower, _bucket, entry in _graphs(manifest):
        entry["bytes"], data = {}, {}
        for precision in ("fp32", "int8"):
            if not entry[precision]:
                continue
            names = [entry[precision]]
            if data_file(staging / entry[precision]).is_file():
                data[precision] = names[-1] + ".data"
                names.append(data[precision])
            entry["bytes"][precision] = sum((staging / name).stat().st_size for name in names)
            files.update({name: {"bytes": (staging / name).stat().st_size} for name in names})
        if data:
            entry["data"] = data
        else:
            entry.pop("data", None)
    for name, record in files.items():
        # hashed once here: a changed or truncated weights file is then told from the export's own
        record["sha256"] = sha256_file(staging / name)
    return files


def _release_torch_weights(encoder: TorchEncoder) -> None:
    """Free the export's own torch model's tensors (the encoder is loaded for the export and
    dropped after it; its config and fingerprint stay readable)."""
    encoder.fingerprint  # computed (and cached) while the weights are there  # noqa: B018
    encoder.model.to("meta")
    gc.collect()


def _choose_recipe(encoder: TorchEncoder, staging: Path, tower: str, fp32_name: str, int8_name: str,
                   run: _GraphRun, reference: np.ndarray,
                   candidates: list[str], max_single_bytes: int = SINGLE_FILE_MAX_BYTES,
                   ) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Quantise one graph with each candidate recipe in turn (fastest first) and keep the first
    whose vectors are within INT8_TARGET_COSINE of torch; when none is, the closest.
    Returns (recipe name, what was tried, the kept copy's cosines)."""
    heads, hidden = attention_shape(encoder, tower)
    tried: list[dict[str, Any]] = []
    best: tuple[float, str, Path, dict[str, Any]] | None = None
    seen: set[str] = set()
    for candidate in candidates:
        recipe = get_recipe(candidate)
        if recipe.patch_matmul and not _has_conv(staging / fp32_name):
            # nothing to rewrite (a text graph): the recipe is its plain-MatMul twin, recorded as such
            recipe = RECIPES.get(recipe.name.removeprefix("patch-"), recipe)
        name = recipe.name
        if name in seen:
            continue
        seen.add(name)
        trial = staging / f".trial-{name}-{int8_name}"
        quantize_int8(staging / fp32_name, trial, recipe, family=str(encoder.family), tower=tower,
                      heads=heads, hidden=hidden, max_single_bytes=max_single_bytes)
        cosines = _graph_cosines(trial, run, reference)
        tried.append({"recipe": name, "min_cosine": cosines["min"], "mean_cosine": cosines["mean"]})
        if best is None or cosines["min"] > best[0]:
            if best is not None:
                remove_graph(best[2])
            best = (cosines["min"], name, trial, cosines)
        else:
            remove_graph(trial)
        if cosines["min"] >= INT8_TARGET_COSINE:
            break
    assert best is not None
    _, name, trial, cosines = best
    move_graph(trial, staging / int8_name)
    return name, tried, cosines


def _has_conv(path: Path) -> bool:
    return "Conv" in op_counts(path, interesting=("Conv",))


@dataclass
class _GraphRun:
    """How one graph's copies are measured: feeds (the parity samples it serves, in batches),
    their rows in ``samples[tower]``, and how a session of the graph turns a feed into
    embeddings (a bucket graph through the shared language model, when there is one)."""

    feeds: list[dict[str, np.ndarray]]
    rows: list[int]
    embed: Callable[[Any, dict[str, np.ndarray]], np.ndarray] = lambda session, feed: session.run(None, feed)[0]


def _graph_cosines(path: Path, run: _GraphRun, reference: np.ndarray) -> dict[str, Any]:
    """Cosines to ``reference[run.rows]`` of the vectors a copy of one graph gives."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    got = np.concatenate([run.embed(session, feed) for feed in run.feeds])
    return _cosines(reference[run.rows], got)


def _graph_run(encoder: OnnxEncoder, tower: str, part: Bucket | str | None,
               samples: dict[str, list[Any]]) -> _GraphRun:
    if part == LANGUAGE_MODEL:
        feeds, rows = [], []
        for bucket in encoder.image_buckets or ():
            bucket_feeds, bucket_rows = _graph_feeds(encoder, tower, bucket, samples)
            feeds += [_language_inputs(encoder, bucket, feed) for feed in bucket_feeds]
            rows += bucket_rows
        return _GraphRun(feeds, rows)
    assert not isinstance(part, str)
    feeds, rows = _graph_feeds(encoder, tower, part, samples)
    if part is not None and encoder.shares_language_model:
        return _GraphRun(feeds, rows, lambda session, feed: encoder.run_image_graphs(part, feed, session=session))
    return _GraphRun(feeds, rows)


def _language_inputs(encoder: OnnxEncoder, bucket: Bucket, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shared language model's feed: ``bucket``'s fp32 graph's outputs on ``feed``."""
    session = encoder._session("image", bucket)
    return {output.name: value for output, value in zip(session.get_outputs(), session.run(None, feed), strict=True)}


def _chained_int8_parity(staging: Path, samples: dict[str, list[Any]],
                         reference: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per bucket, cosines to torch of the INT8 bucket graph followed by the INT8 language model."""
    int8_encoder = OnnxEncoder(staging, precision="int8", batch_size=4)
    preprocessor = int8_encoder.image_preprocessor
    assert isinstance(preprocessor, BucketImagePreprocessor)
    got = int8_encoder.encode_images(samples["image"])
    return {f"image {format_bucket(bucket)}": _cosines(reference["image"][rows], got[rows])
            for bucket, (rows, _) in preprocessor.group(samples["image"]).items()}


def _graphs(manifest: dict[str, Any]) -> list[tuple[str, Bucket | str | None, dict[str, Any]]]:
    """(tower, part, manifest entry with the "fp32"/"int8" file names) per ONNX graph; part is
    None (a whole tower), a bucket, or ``LANGUAGE_MODEL`` (the graph the buckets share)."""
    graphs: list[tuple[str, Bucket | str | None, dict[str, Any]]] = []
    for tower in ("text", "image"):
        spec = manifest.get(tower)
        if not spec:
            continue
        if spec.get("kind") == "buckets":
            # the language model first: its INT8 trials run on the small bucket graphs, so the
            # fp32 language model's session (which the bucket graphs' trials need) opens later
            if spec.get("language_model"):
                graphs.append((tower, LANGUAGE_MODEL, spec["language_model"]))
            graphs += [(tower, (int(entry["width"]), int(entry["height"])), entry) for entry in spec["buckets"]]
        else:
            graphs.append((tower, None, spec))
    return graphs


def _export_buckets(encoder: TorchEncoder, staging: Path, config: dict[str, Any], opset: int,
                    max_single_bytes: int = SINGLE_FILE_MAX_BYTES) -> dict[str, Any]:
    """One vision graph per bucket and one language model graph for all of them
    (``vkd.export.qwen_image``); the manifest's image entry."""
    import torch

    from vkd.export.qwen_image import QwenBucketImageTower, QwenBucketVision, QwenLanguageModel

    preprocessor = BucketImagePreprocessor({**config["preprocess"], "buckets": bucket_names(config["buckets"])})
    entries = []
    language: tuple[Any, tuple[Any, ...]] | None = None
    for bucket in config["buckets"]:
        size = format_bucket(bucket)
        try:
            tower = QwenBucketImageTower(encoder, bucket).eval()
        except (ValueError, ImportError, AttributeError) as error:
            raise ExportError(f"image bucket {size}: cannot build its fixed-size graph: {error}") from error
        # two images: the graph is traced with a batch, and the batch axis is marked dynamic
        pixels = torch.from_numpy(np.stack([preprocessor.one(image, bucket) for image in sample_images(2)]))
        names = tower.vision_outputs
        name = f"image-{size}.onnx"
        _torch_export(QwenBucketVision(tower).eval(), (pixels,), staging / name, ["pixel_values"],
                      {"pixel_values": {0: "batch"}}, opset, max_single_bytes,
                      outputs={output: {1 if output == "deepstack" else 0: "batch"} for output in names})
        entries.append({"size": size, "width": bucket[0], "height": bucket[1], "image_tokens": tower.tokens,
                        "sequence_length": tower.length, "fp32": name, "int8": None})
        if language is None:
            with torch.no_grad():
                language = (tower, tower.vision(pixels))
    assert language is not None
    tower, traced = language
    names = tower.vision_outputs
    # traced at the first bucket's sequence length; the axis is dynamic, so every bucket runs it
    axes = {output: ({1: "batch", 2: "sequence"} if output == "deepstack" else {0: "batch", 1: "sequence"})
            for output in names}
    _torch_export(QwenLanguageModel(tower).eval(), traced, staging / "image-language-model.onnx", names, axes,
                  opset, max_single_bytes)
    language_model = {"fp32": "image-language-model.onnx", "int8": None, "inputs": names}
    return {"kind": "buckets", "policy": BUCKET_POLICY, "preprocess": config["preprocess"],
            "language_model": language_model, "buckets": entries}


def _calibration_feeds(encoder: OnnxEncoder, tower: str, texts: list[str], images: list[Path],
                       batch: int = 8, part: Bucket | str | None = None) -> list[dict[str, np.ndarray]]:
    items: Sequence[Any] = texts if tower == "text" else images
    if not items:
        raise ExportError(f"static INT8 of the {tower} tower needs calibration {tower}s; the calibration file has none")
    if tower == "text":
        return [encoder.text_inputs(items[start : start + batch]) for start in range(0, len(items), batch)]
    if part == LANGUAGE_MODEL:  # on every bucket graph's outputs
        return [_language_inputs(encoder, bucket, feed) for bucket in encoder.image_buckets or ()
                for feed in _calibration_feeds(encoder, tower, texts, images, batch, part=bucket)]
    assert not isinstance(part, str)
    # a bucket's graph is calibrated on every calibration image, resized to that bucket
    return [encoder.image_inputs(items[start : start + batch], bucket=part) for start in range(0, len(items), batch)]


def _bucket_samples(buckets: Sequence[Bucket]) -> list[Any]:
    """One noise image per bucket at its exact size, so every bucket's graph is checked (the
    other samples, of other sizes, exercise the resize into a bucket)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for width, height in buckets]


def _parity_samples(manifest: dict[str, Any], calib_texts: list[str],
                    calib_images: list[Path]) -> dict[str, list[Any]]:
    samples: dict[str, list[Any]] = {"text": SAMPLE_TEXTS + calib_texts}
    if manifest["image"] is not None:
        buckets = [(int(entry["width"]), int(entry["height"])) for entry in manifest["image"].get("buckets", ())]
        samples["image"] = sample_images() + list(calib_images) + _bucket_samples(buckets)
    return samples


def _torch_reference(encoder: TorchEncoder, samples: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    # Batches of 4 so padding within a batch is exercised as in real use.
    reference = {"text": encoder.encode_text(samples["text"], batch_size=4)}
    if "image" in samples:
        reference["image"] = encoder.encode_images(samples["image"], batch_size=4)
    return reference


def _graph_feeds(encoder: OnnxEncoder, tower: str, bucket: Bucket | None, samples: dict[str, list[Any]],
                 batch: int = 4) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """One graph's feeds for the parity samples it serves, in batches, and their rows in
    ``samples[tower]`` (a bucket's graph serves the images nearest its aspect ratio)."""
    items = samples[tower]
    if tower == "text":
        rows = list(range(len(items)))
        return [encoder.text_inputs(items[start : start + batch]) for start in range(0, len(items), batch)], rows
    if bucket is None:
        rows = list(range(len(items)))
        return [encoder.image_inputs(items[start : start + batch]) for start in range(0, len(items), batch)], rows
    preprocessor = encoder.image_preprocessor
    assert isinstance(preprocessor, BucketImagePreprocessor)
    rows = [row for row, item in enumerate(items) if preprocessor.bucket_of(load_rgb(item)) == bucket]
    mine = [items[row] for row in rows]
    return [encoder.image_inputs(mine[start : start + batch], bucket=bucket)
            for start in range(0, len(mine), batch)], rows


def _parity(staging: Path, manifest: dict[str, Any], samples: dict[str, list[Any]],
            reference: dict[str, np.ndarray], int8_parity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """fp32 through ``OnnxEncoder`` (tokenizer, preprocessing, bucket routing and all) against
    torch; INT8 as each graph's kept copy measured on the same samples (``int8_parity``)."""
    onnx_encoder = OnnxEncoder(staging, precision="fp32", batch_size=4)
    towers: dict[str, dict[str, Any]] = {}
    per_bucket: dict[str, dict[str, Any]] = {}
    for tower, ref in reference.items():
        items = samples[tower]
        got = onnx_encoder.encode_text(items) if tower == "text" else onnx_encoder.encode_images(items)
        towers[tower] = {"fp32": _cosines(ref, got)}
        preprocessor = onnx_encoder.image_preprocessor if tower == "image" else None
        if isinstance(preprocessor, BucketImagePreprocessor):
            for bucket, (rows, _) in preprocessor.group(items).items():
                per_bucket[format_bucket(bucket)] = {"fp32": _cosines(ref[rows], got[rows])}
    for key, numbers in int8_parity.items():
        if key.startswith("image "):
            per_bucket.setdefault(key.removeprefix("image "), {})["int8"] = numbers
        else:
            towers[key]["int8"] = numbers
    if per_bucket and int8_parity:
        # the image tower's INT8 figure over all buckets: every sample, each in its own bucket
        weights = [numbers["int8"] for numbers in per_bucket.values() if "int8" in numbers]
        towers["image"]["int8"] = {
            "min": min(numbers["min"] for numbers in weights),
            "mean": float(sum(numbers["mean"] * numbers["n"] for numbers in weights) / sum(n["n"] for n in weights)),
            "n": int(sum(numbers["n"] for numbers in weights)),
        }
    parity: dict[str, Any] = {"min_cosine": dict(PARITY_MIN_COSINE), "int8_target_cosine": INT8_TARGET_COSINE,
                              "towers": towers}
    if per_bucket:
        parity["image_buckets"] = per_bucket
    return parity
