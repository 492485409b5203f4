"""INT8 recipes for the exported towers, and how the export picks one.

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``: weights stored INT8,
activations quantised per call) has several knobs, and its defaults are not the fastest for
these graphs. ``vkd export MODEL --int8-variants`` (``vkd.bench.int8``) measures every recipe
below on any model. What each step does and why, with the short probes that found it
(2-layer random copies at the real widths, ``vkd model random --layers 2``, one thread, CPU
time, on a shared 2-core machine: ratios, not published figures; at full depth the per-layer
share grows, so image speedups grow a little):

* **op types.** ``quantize_dynamic``'s default quantises every op it can, including the
  image towers' patch-embedding ``Conv`` as ``ConvInteger``, which ONNX Runtime runs far
  slower than the fp32 ``Conv``: ViT-B/32 image INT8 was 1.5x fp32 ONNX with it, 2.4-2.5x
  without (B/16 2.4x -> 2.7-3.0x, L/14 2.8x -> 3.4x, SigLIP 2.2x -> 2.6x). Recipes quantise
  ``MatMul`` (ONNX Runtime then fuses quantiser + MatMulInteger + scale into
  ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``), optionally ``Gather`` (embedding
  tables: text files 3-4x smaller, e.g. CLIP B text 103 -> 31 MiB, Qwen3-VL 2-layer text
  1283 -> 393 MiB, no speed change, min cosine a few 1e-5 lower), never ``Conv``.
* **patch embedding as MatMul.** The patch ``Conv`` (kernel = stride, no padding) is
  rewritten as reshape + transpose + ``MatMul`` (``patch_conv_as_matmul``; the same numbers in
  fp32) so that it is quantised too: B/32 image 2.4x -> 3.2x; little change where the patch
  embedding is a small share (B/16, L/14, SigLIP, Qwen). Quantising the normalised pixels can
  cost accuracy (SigLIP 0.9996 -> 0.9985 min cosine), hence the fallbacks below.
* **per-channel weights.** One scale per output column instead of per matrix: the same ops
  and, within the probes' noise, the same speed; min cosine slightly higher (CLIP B text
  0.99910 -> 0.99931, SigLIP text 0.99917 -> 0.99937, Qwen text 0.9956 -> 0.9965).
* **transformer fusions** (``onnxruntime.transformers.optimizer``; this onnxruntime has model
  types "clip", "vit", "bert", "gpt2", "qwen3", ...): its Attention fusion (what ``QAttention``
  needs) matches none of these graphs (transformers 5 exports attention as SDPA, or eager with
  casts around the softmax), and the LayerNorm / SkipLayerNorm / (Quick)Gelu fusions it makes
  ONNX Runtime's session optimiser makes at load anyway; before quantisation they were
  neutral to slower (B/16 image 2.9x -> 2.4x: a bias folded into SkipLayerNorm is one the
  quantised MatMul no longer absorbs). Kept measurable as ``fused``, used by no default.
* **SigLIP's pooling head** (``nn.MultiheadAttention``) slices its packed in-projection at
  bounds computed from the input's shape, so its key/value projection over every patch was a
  MatMul on a non-constant weight that no recipe could quantise; the export traces it through
  explicit q/k/v Linears instead (``onnx_export._explicit_attention``): SigLIP image INT8
  32 -> 27 ms/img at 2 layers (~3 % at full depth).
* **text padding.** CLIP and Qwen3-VL text graphs take any length (batches padded to their
  longest); SigLIP's must be padded to 64 (it was trained so and pools the last position).
  Padding CLIP B queries to 77 instead of ~12 tokens costs 2.5x (fp32 4.3 -> 10.9 ms/query at
  batch 32; INT8 1.5 -> 3.9), which is SigLIP's fixed cost. INT8 vs fp32 ONNX is 2.7-4.4x for
  every text tower probed, and up to 15x vs torch at batch 1 (CLIP B/32 queries, where
  torch's per-call overhead dominates; SigLIP's 64 tokens: 4x).

Below 2x vs fp32 ONNX was only the legacy recipe on image towers (ConvInteger). Qwen3-VL
(2-layer, real widths) runs INT8 3.6-3.9x (text) and 2.7-3.3x (448x448 image) faster than
fp32 ONNX, but its random-weight copies reach only 0.996-0.998 cosine to fp32 with any
recipe (per-tensor dynamic activation scales over 2048-wide rows); the export then keeps the
closest candidate, gated at ``PARITY_MIN_COSINE["int8"]``.

The export tries ``DEFAULT_CANDIDATES`` in order (fastest first) per graph and keeps the
first whose vectors stay within ``INT8_TARGET_COSINE`` of the torch model on the parity
samples; ``export.json`` records the recipe and what was tried.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vkd.export.layout import SINGLE_FILE_MAX_BYTES, external_files, graph_bytes, relayout

#: The INT8 copy the export prefers must stay at least this close to torch (min cosine over
#: the parity samples); the export's hard INT8 gate stays PARITY_MIN_COSINE["int8"].
INT8_TARGET_COSINE = 0.999


@dataclass(frozen=True)
class Int8Recipe:
    """One way to make the INT8 copy of an fp32 graph (dynamic quantization)."""

    name: str
    summary: str
    #: ops ``quantize_dynamic`` may quantise; empty: all it can (its default)
    op_types: tuple[str, ...] = ("MatMul",)
    per_channel: bool = False
    #: rewrite patch-embedding Convs as MatMul first (``patch_conv_as_matmul``)
    patch_matmul: bool = False
    #: run onnxruntime.transformers' fusions first (model type per tower: ``optimizer_model_type``)
    fuse: bool = False

    def describe(self) -> dict[str, Any]:
        """Plain JSON (lists, not tuples), as export.json and --variants-out store it."""
        return {**asdict(self), "op_types": list(self.op_types)}


RECIPES: dict[str, Int8Recipe] = {recipe.name: recipe for recipe in (
    Int8Recipe("legacy", "quantize_dynamic's defaults as vkd used them before: every op it can (Conv as "
               "ConvInteger, MatMul, Gather, ...), per-channel", op_types=(), per_channel=True),
    Int8Recipe("matmul", "MatMul only, one scale per weight matrix"),
    Int8Recipe("matmul-pc", "MatMul only, per-channel weight scales", per_channel=True),
    Int8Recipe("matmul-gather-pc", "MatMul and Gather (embedding tables), per-channel",
               op_types=("MatMul", "Gather"), per_channel=True),
    Int8Recipe("patch-matmul-pc", "patch Conv rewritten as MatMul, then MatMul only, per-channel",
               per_channel=True, patch_matmul=True),
    Int8Recipe("patch-matmul-gather-pc", "patch Conv as MatMul; MatMul and Gather, per-channel",
               op_types=("MatMul", "Gather"), per_channel=True, patch_matmul=True),
    Int8Recipe("fused", "onnxruntime.transformers fusions, patch Conv as MatMul; MatMul and Gather, per-channel",
               op_types=("MatMul", "Gather"), per_channel=True, patch_matmul=True, fuse=True),
)}

#: What the export tries, fastest first (equal speed: the smaller file first); the first
#: within INT8_TARGET_COSINE of torch is kept, else the closest of them (still gated). The
#: patch MatMul is the one step that can cost accuracy (its input, the normalised pixels, is
#: quantised per call: a 2-layer SigLIP image tower went from 0.9996 to 0.9985 with it), so
#: the last two leave the Conv in fp32. For a text graph the patch step changes nothing and
#: its duplicates are skipped.
DEFAULT_CANDIDATES: tuple[str, ...] = ("patch-matmul-gather-pc", "patch-matmul-pc", "matmul-gather-pc", "matmul-pc")


def get_recipe(name: str) -> Int8Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"INT8 recipe {name!r}: choose one of {', '.join(RECIPES)}") from None


def optimizer_model_type(family: str, tower: str) -> str:
    """onnxruntime.transformers.optimizer's model type for a tower: CLIP's causal text encoder
    is its "clip" (Stable Diffusion's text encoder), vision towers are "vit", the rest "bert"."""
    if tower == "text":
        return "clip" if family == "clip" else "bert"
    return "vit"


class _SilenceQuantizerAdvice(logging.Filter):
    _NOISE = ("pre-processing before quantization", "Inference failed or unsupported type to quantize")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self._NOISE)


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    # quant_pre_process's symbolic shape inference fails on these graphs, so its advice
    # (logged on every call) is noise here, as are the per-tensor "inference failed" notes
    # about integer shape tensors it was never going to quantise.
    root = logging.getLogger()
    advice = _SilenceQuantizerAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


# -- graph rewrites ----------------------------------------------------------------------


def patch_conv_as_matmul(model: Any, base_dir: str | os.PathLike[str] | None = None) -> int:
    """Rewrite each patch-embedding Conv (kernel = stride, no padding, no dilation, one group,
    constant weights, static C/H/W) of ``model`` (an onnx ModelProto, changed in place) as

        X [B, C, H, W] -> Reshape [B, C, gh, kh, gw, kw] -> Transpose [B, gh, gw, C, kh, kw]
        -> Reshape [B, gh*gw, C*kh*kw] -> MatMul W' [C*kh*kw, D] (+ bias)
        -> Reshape [B, gh, gw, D] -> Transpose [B, D, gh, gw]

    which is the Conv's output exactly (each output pixel is one patch's dot products).
    Returns how many Convs were rewritten. ``base_dir``: where the graph's external data
    lives, when it was loaded without it (a Conv's weight is then read from there)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    rewritten = 0
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type != "Conv" or node.input[1] not in initializers:
            continue
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        weight = numpy_helper.to_array(initializers[node.input[1]], base_dir=str(base_dir or ""))
        if weight.ndim != 4:
            continue
        out_dim, channels, kh, kw = weight.shape
        if (list(attrs.get("strides", [1, 1])) != [kh, kw] or any(attrs.get("pads", [0] * 4))
                or any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("group", 1) != 1
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")):
            continue
        shape = shapes.get(node.input[0])
        if not shape or len(shape) != 4 or None in shape[1:]:
            continue
        _, c, height, width = shape
        if c != channels or height % kh or width % kw:
            continue
        gh, gw = height // kh, width // kw
        prefix = f"{node.name or node.output[0]}/as_matmul"

        def const(name: str, array: Any, prefix: str = prefix) -> str:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), f"{prefix}/{name}"))
            return f"{prefix}/{name}"

        matrix = weight.reshape(out_dim, channels * kh * kw).T.copy()
        new = [
            helper.make_node("Reshape", [node.input[0], const("shape_in", np.array([-1, c, gh, kh, gw, kw]))],
                             [f"{prefix}/blocks"]),
            helper.make_node("Transpose", [f"{prefix}/blocks"], [f"{prefix}/patches6"], perm=[0, 2, 4, 1, 3, 5]),
            helper.make_node("Reshape", [f"{prefix}/patches6", const("shape_patches", np.array([-1, gh * gw, c * kh * kw]))],
                             [f"{prefix}/patches"]),
            helper.make_node("MatMul", [f"{prefix}/patches", const("weight", matrix)], [f"{prefix}/projected"]),
        ]
        last = f"{prefix}/projected"
        if len(node.input) > 2 and node.input[2]:
            new.append(helper.make_node("Add", [last, node.input[2]], [f"{prefix}/biased"]))
            last = f"{prefix}/biased"
        new += [
            helper.make_node("Reshape", [last, const("shape_grid", np.array([-1, gh, gw, out_dim]))], [f"{prefix}/grid"]),
            helper.make_node("Transpose", [f"{prefix}/grid"], [node.output[0]], perm=[0, 3, 1, 2]),
        ]
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new_node in enumerate(new):
            model.graph.node.insert(position + offset, new_node)
        rewritten += 1
    if rewritten:
        still_used = {name for node in model.graph.node for name in node.input}
        for tensor in list(model.graph.initializer):
            if tensor.name not in still_used:
                model.graph.initializer.remove(tensor)
        if base_dir is None:  # with external data the checker needs the saved file's path (the caller's)
            onnx.checker.check_model(model)
    return rewritten


def _fuse(model: Any, out: Path, family: str, tower: str, heads: int, hidden: int) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(model, model_type=optimizer_model_type(family, tower), num_heads=heads,
                               hidden_size=hidden, opt_level=0)
    # its own save adds the com.microsoft opset import the fused ops need
    optimized.save_model_to_file(str(out))


# -- quantization ------------------------------------------------------------------------


def quantize_int8(
    fp32: str | os.PathLike[str],
    int8: str | os.PathLike[str],
    recipe: Int8Recipe | str,
    *,
    family: str = "",
    tower: str = "text",
    heads: int = 0,
    hidden: int = 0,
    max_single_bytes: int = SINGLE_FILE_MAX_BYTES,
) -> dict[str, Any]:
    """Write the INT8 copy of ``fp32`` to ``int8`` with ``recipe``; returns what was done
    (rewrites made, op counts of the result).

    ``fp32`` may keep its weights in external data (``vkd.export.layout``); the copy is
    written as one file when its tensors total at most ``max_single_bytes``, else as
    ``int8`` + ``int8.data``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    notes: dict[str, Any] = {"recipe": recipe.name}
    fp32, int8 = Path(fp32), Path(int8)
    external = bool(external_files(fp32))
    large = graph_bytes(fp32) > max_single_bytes
    source: Path = fp32
    # A rewritten graph is saved beside fp32: with external data it keeps referring to fp32's
    # data file (onnx refuses locations outside the graph's folder), so the weights are not
    # copied, and with inline data it is small.
    prepared = fp32.with_name(f".prepared-{os.getpid()}-{int8.name}")
    try:
        if recipe.patch_matmul or recipe.fuse:
            model = onnx.load(str(fp32), load_external_data=not external)
            if recipe.patch_matmul:
                notes["patch_convs_as_matmul"] = patch_conv_as_matmul(model, base_dir=fp32.parent)
            source = prepared
            if recipe.fuse:
                if external:
                    raise ValueError(f"{fp32.name}: the 'fused' recipe needs the weights in memory; it does not run "
                                     "on graphs with external data (choose another recipe)")
                _fuse(model, source, family, tower, heads, hidden)
            else:
                onnx.save(model, str(source))
                onnx.checker.check_model(str(source))
        with quiet_quantizer():
            # DefaultTensorType: shape inference cannot type the outputs of fused contrib ops
            quantize_dynamic(source, int8, weight_type=QuantType.QInt8, per_channel=recipe.per_channel,
                             op_types_to_quantize=list(recipe.op_types) or None,
                             use_external_data_format=large,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        prepared.unlink(missing_ok=True)
    # onnxruntime writes every tensor to int8.data when asked for external data; small enough
    # copies go back to one file, large ones get vkd's layout
    relayout(int8, int8, max_single_bytes)
    notes["ops"] = op_counts(int8)
    return notes


def op_counts(path: str | os.PathLike[str], interesting: Sequence[str] = (
        "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DequantizeLinear", "QAttention", "Attention",
        "MatMul", "Conv", "Gather")) -> dict[str, int]:
    """How many nodes of each ``interesting`` op type the graph at ``path`` has (non-zero only)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in interesting:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def attention_shape(encoder: Any, tower: str) -> tuple[int, int]:
    """(heads, hidden size) of ``tower`` from the torch encoder's config (0, 0 when unknown),
    what onnxruntime.transformers' fusions need."""
    config = getattr(getattr(encoder, "model", None), "config", None)
    if config is None:
        return 0, 0
    sub = config.get_text_config() if tower == "text" else getattr(config, "vision_config", None)
    if sub is None:
        return 0, 0
    heads = getattr(sub, "num_attention_heads", None) or getattr(sub, "num_heads", 0)
    return int(heads or 0), int(getattr(sub, "hidden_size", 0) or 0)
