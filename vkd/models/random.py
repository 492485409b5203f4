"""Random models at the real architectures' sizes (``vkd model random``).

Speed and memory do not need trained weights (DESIGN.md, "Encoders"): a model with the
real config — depth, widths, heads, vocabulary, image size — costs what the real one
costs. Each arch below is the published checkpoint's config.json; the directory this
writes is an ordinary model directory (config.json, safetensors, tokenizer, image
processor) that ``load_encoder``, ``vkd index`` and ``vkd export`` open like the real
checkpoint, and its ``vkd.json`` says the weights are random (``vkd.models.provenance``).

Sources of the config values (config.json of each hub checkpoint, as mirrored in public
code; transformers' own defaults where its docs name the checkpoint):

* ``clip-vit-b32`` — openai/clip-vit-base-patch32 (= transformers' ``CLIPConfig()`` defaults):
  text 512 x 12 layers, 8 heads, MLP 2048, vocab 49408, 77 positions; vision 768 x 12, 12 heads,
  MLP 3072, 224 px, patch 32; projection 512.
* ``clip-vit-b16`` — openai/clip-vit-base-patch16: as B/32 with patch 16.
* ``clip-vit-l14`` — openai/clip-vit-large-patch14: text 768 x 12, 12 heads, MLP 3072; vision
  1024 x 24, 16 heads, MLP 4096, 224 px, patch 14; projection 768.
* ``siglip-base-patch16-224`` — google/siglip-base-patch16-224 (= ``SiglipConfig()`` defaults):
  text 768 x 12, 12 heads, MLP 3072, vocab 32000, 64 positions; vision 768 x 12, 12 heads, MLP
  3072, 224 px, patch 16; the embedding is the 768-d pooled output of each tower.
* ``qwen3-vl-embedding-2b`` — Qwen/Qwen3-VL-Embedding-2B, fine-tuned from Qwen3-VL-2B-Instruct
  and of its architecture (loaded as ``Qwen3VLForConditionalGeneration``): text 2048 x 28,
  16 heads, 8 KV heads, head 128, MLP 6144, vocab 151936, tied embeddings, rope theta 5e6,
  interleaved M-RoPE [24, 20, 20]; vision 1024 x 24 blocks, 16 heads, MLP 4096, patch 16,
  merge 2, temporal patch 2, 2304 position embeddings, DeepStack taps [5, 11, 17].
* ``qwen3-vl-embedding-8b`` — Qwen/Qwen3-VL-Embedding-8B (Qwen3-VL-8B-Instruct's architecture):
  text 4096 x 36, 32 heads, 8 KV heads, head 128, MLP 12288, vocab 151936, untied lm_head;
  vision 1152 x 27 blocks, 16 heads, MLP 4304, DeepStack taps [8, 16, 24]; rest as the 2B.

What is not real: the weights (normal(0, 0.02) matrices, norms at one, biases at zero, the
logit scale at the model's starting value) and the tokenizer, a byte-level BPE trained
locally on a small word list (``vkd.models.tiny``) and padded with unreachable entries to
the real vocabulary size, so the embedding table, the tokenizer's length and the parameter
count are real but a text may split into more tokens than the real tokenizer makes.

The model is never allocated: it is instantiated on the ``meta`` device (shapes only) and
each tensor is drawn (on every core), written to its safetensors file and dropped in turn,
so the build holds at most two tensors (one being written while the next is drawn; the 8B's
largest, its 151936 x 4096 embedding table, is 1.2 GB in bf16) whatever the model's size.
``--layers N`` builds a depth-truncated copy (fewer layers of the same widths: tests, and
per-layer costs to extrapolate the full depth from), recorded as such in ``vkd.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Arch:
    """A real architecture: the config.json values of its published checkpoint."""

    name: str
    family: str  # "clip", "siglip" or "qwen3-vl" (vkd.models.tiny's family names)
    reference: str  # the hub checkpoint whose shapes these are
    text: Mapping[str, Any]  # text_config keys
    vision: Mapping[str, Any]  # vision_config keys
    top: Mapping[str, Any] = field(default_factory=dict)  # top-level config keys
    dtype: str = "float32"  # the published checkpoint's storage dtype: the default here
    published_parameters: float = 0.0  # as the model card rounds it
    image_size: int | None = None  # dual encoders: the square input side

    @property
    def vision_depth_key(self) -> str:
        return "depth" if self.family == "qwen3-vl" else "num_hidden_layers"

    @property
    def text_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def vision_layers(self) -> int:
        return int(self.vision[self.vision_depth_key])

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def dim(self) -> int:
        """The embedding size: CLIP's projection, SigLIP's and Qwen3-VL's text hidden size."""
        return int(self.top.get("projection_dim") or self.text["hidden_size"])


_CLIP_B_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
_CLIP_B_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 224, "hidden_act": "quick_gelu"}
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
              "mrope_interleaved": True}
_QWEN_TEXT = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, "max_position_embeddings": 262144,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_parameters": _QWEN_ROPE}
_QWEN_VISION = {"num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3}

# published_parameters: the count as the model cards and hub pages round it (CLIP B/32 151.3M,
# B/16 149.6M, L/14 427.6M, SigLIP base 203.2M; Qwen3-VL-2B ~2.1B with tied embeddings, 8B
# ~8.8B with its untied lm_head); tests/test_random_models.py pins the exact counts.
ARCHS: dict[str, Arch] = {arch.name: arch for arch in (
    Arch("clip-vit-b32", "clip", "openai/clip-vit-base-patch32", _CLIP_B_TEXT, {**_CLIP_B_VISION, "patch_size": 32},
         {"projection_dim": 512}, published_parameters=151.3e6, image_size=224),
    Arch("clip-vit-b16", "clip", "openai/clip-vit-base-patch16", _CLIP_B_TEXT, {**_CLIP_B_VISION, "patch_size": 16},
         {"projection_dim": 512}, published_parameters=149.6e6, image_size=224),
    Arch("clip-vit-l14", "clip", "openai/clip-vit-large-patch14",
         {**_CLIP_B_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
         {**_CLIP_B_VISION, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "patch_size": 14},
         {"projection_dim": 768}, published_parameters=427.6e6, image_size=224),
    Arch("siglip-base-patch16-224", "siglip", "google/siglip-base-patch16-224",
         {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh"},
         {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh"},
         published_parameters=203.2e6, image_size=224),
    Arch("qwen3-vl-embedding-2b", "qwen3-vl", "Qwen/Qwen3-VL-Embedding-2B",
         {**_QWEN_TEXT, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
          "num_attention_heads": 16},
         {**_QWEN_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048,
          "deepstack_visual_indexes": [5, 11, 17]},
         {"tie_word_embeddings": True}, dtype="bfloat16", published_parameters=2.1e9),
    Arch("qwen3-vl-embedding-8b", "qwen3-vl", "Qwen/Qwen3-VL-Embedding-8B",
         {**_QWEN_TEXT, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
          "num_attention_heads": 32},
         {**_QWEN_VISION, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
          "deepstack_visual_indexes": [8, 16, 24]},
         {"tie_word_embeddings": False}, dtype="bfloat16", published_parameters=8.8e9),
)}

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_ITEM_BYTES = {"float32": 4, "bfloat16": 2}
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16"}
#: Shards of at most this many bytes, as the hub's large checkpoints are cut (the 8B in bf16: 4 files).
MAX_SHARD_BYTES = 5 * 10**9
#: A build is refused when its weights exceed this share of the machine's memory: the model
#: is built to be loaded, and one that cannot be loaded here is of no use here.
MEMORY_SHARE = 0.8
INIT_STD = 0.02  # every arch's initializer_range
_CHUNK = 1 << 22  # values drawn per thread task (16 MB in fp32)
# exp(logit_scale) is the similarity scale: CLIP starts at 1/0.07 (its logit_scale_init_value),
# SigLIP at 1 (and its logit bias at 0), as transformers initialises them.
_LOGIT_SCALE = {"clip": math.log(1 / 0.07), "siglip": 0.0}
# Ids for configs built only to count parameters (no tokenizer): any ids inside the vocabulary.
_QWEN_REAL_IDS = {"pad_token_id": 151643, "bos_token_id": 151643, "eos_token_id": 151645,
                  "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}
_DUAL_PLACEHOLDER_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


class DoesNotFit(ValueError):
    """The model asked for is larger than this machine can hold (memory or disk)."""


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def resolve_dtype(arch: Arch, dtype: str | None) -> str:
    """"float32" or "bfloat16"; None: the published checkpoint's (bf16 for Qwen3-VL)."""
    if dtype is None:
        return arch.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose fp32 or bf16")
    return DTYPES[dtype]


def depths(arch: Arch, layers: int | None = None, vision_layers: int | None = None) -> dict[str, int]:
    """Layers kept per stack: ``layers`` caps every stack (each keeps at most its own depth),
    ``vision_layers`` sets the vision stack's; None keeps the full depth."""
    for flag, value, most in (("layers", layers, max(arch.text_layers, arch.vision_layers)),
                              ("vision_layers", vision_layers, arch.vision_layers)):
        if value is not None and not 1 <= value <= most:
            raise ValueError(f"{flag}={value}: {arch.name} has {arch.text_layers} text layers and "
                             f"{arch.vision_layers} vision layers; give 1..{most}")
    text = min(layers, arch.text_layers) if layers is not None else arch.text_layers
    vision = vision_layers if vision_layers is not None else (
        min(layers, arch.vision_layers) if layers is not None else arch.vision_layers)
    return {"text": text, "vision": vision}


def _sub_configs(arch: Arch, kept: Mapping[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    # deep copies: a config may normalise its nested dicts (rope_parameters) in place
    text = {**copy.deepcopy(dict(arch.text)), "num_hidden_layers": kept["text"]}
    vision = {**copy.deepcopy(dict(arch.vision)), arch.vision_depth_key: kept["vision"]}
    if arch.family == "qwen3-vl":
        # DeepStack taps past a truncated vision stack never fire; their mergers go with them.
        vision["deepstack_visual_indexes"] = [i for i in arch.vision["deepstack_visual_indexes"] if i < kept["vision"]]
    return text, vision


def build_config(arch: Arch, *, layers: int | None = None, vision_layers: int | None = None,
                 tokenizer: Any = None) -> Any:
    """The transformers config of ``arch`` (depth-truncated as asked), with the token ids of
    ``tokenizer`` (None: ids good enough for counting parameters)."""
    text, vision = _sub_configs(arch, depths(arch, layers, vision_layers))
    if arch.family == "qwen3-vl":
        from vkd.models.tiny import qwen3vl_config, qwen3vl_token_ids

        ids = qwen3vl_token_ids(tokenizer) if tokenizer is not None else _QWEN_REAL_IDS
        return qwen3vl_config(text, vision, ids, tie_word_embeddings=bool(arch.top["tie_word_embeddings"]))
    ids = (_DUAL_PLACEHOLDER_IDS if tokenizer is None else
           {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id})
    if arch.family == "clip":
        from transformers import CLIPConfig

        projection = arch.top["projection_dim"]
        return CLIPConfig(text_config={**text, **ids, "projection_dim": projection},
                          vision_config={**vision, "projection_dim": projection}, projection_dim=projection)
    from transformers import SiglipConfig

    return SiglipConfig(text_config={**text, **ids, "projection_size": text["hidden_size"]}, vision_config=vision)


def model_class(family: str) -> type:
    """The class the hub checkpoints of ``family`` are saved as."""
    import transformers

    name = {"clip": "CLIPModel", "siglip": "SiglipModel", "qwen3-vl": "Qwen3VLForConditionalGeneration"}[family]
    return getattr(transformers, name)


def meta_model(arch: Arch, config: Any) -> Any:
    """The model on the ``meta`` device: every parameter's name and shape, no memory."""
    import torch

    with torch.device("meta"):
        model = model_class(arch.family)(config)
    if arch.top.get("tie_word_embeddings") and hasattr(model, "lm_head"):
        # tie explicitly: in a long test session transformers' own tying was seen to leave the 2B's
        # lm_head separate (311M parameters more), depending on what ran before
        model.lm_head.weight = model.get_input_embeddings().weight
    return model


def count_parameters(arch: Arch | str, *, layers: int | None = None, vision_layers: int | None = None) -> int:
    """Parameters of ``arch`` (tied weights once), counted on the meta device: nothing allocated."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    model = meta_model(arch, build_config(arch, layers=layers, vision_layers=vision_layers))
    return sum(parameter.numel() for parameter in model.parameters())  # parameters() yields a tied one once


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return None


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_count(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _most_layers(arch: Arch, max_parameters: int, below: int) -> int | None:
    """The largest ``--layers`` value under ``below`` whose copy has at most ``max_parameters``."""
    low, high = 0, below
    while low < high:  # parameters grow with the depth: bisect
        middle = (low + high + 1) // 2
        if count_parameters(arch, layers=middle) <= max_parameters:
            low = middle
        else:
            high = middle - 1
    return low or None


def check_fits(arch: Arch, dtype: str, kept: Mapping[str, int], out_dir: Path, *,
               memory_bytes: int | None = None, free_disk_bytes: int | None = None) -> int:
    """The weight bytes of the build asked for; ``DoesNotFit`` (saying what would fit) when
    they exceed ``MEMORY_SHARE`` of the machine's memory or the free disk at ``out_dir``."""
    item = _ITEM_BYTES[dtype]
    params = count_parameters(arch, layers=kept["text"], vision_layers=kept["vision"])
    weight_bytes = params * item
    memory = memory_bytes if memory_bytes is not None else physical_memory_bytes()
    where = _existing_parent(out_dir)
    free = free_disk_bytes if free_disk_bytes is not None else shutil.disk_usage(where).free
    limit = int(memory * MEMORY_SHARE) if memory else None
    # the tokenizer and config files: a few MB; the margin keeps the disk from filling to the byte
    need_disk = weight_bytes + 64 * 10**6
    too_big = []
    if limit is not None and weight_bytes > limit:
        too_big.append(f"more than {MEMORY_SHARE:.0%} of this machine's {format_bytes(memory or 0)} of memory "
                       f"({format_bytes(limit)}; a model that cannot be loaded here is of no use here)")
    if need_disk > free:
        too_big.append(f"more than the {format_bytes(free)} free on the disk at {where}")
    if not too_big:
        return weight_bytes
    budget = min(value for value in (limit, free - 64 * 10**6) if value is not None)
    fits = []
    if dtype == "float32" and params * _ITEM_BYTES["bfloat16"] <= budget:
        fits.append(f"--dtype bf16 ({format_bytes(params * _ITEM_BYTES['bfloat16'])})")
    for option in (dtype, "bfloat16") if dtype == "float32" and not fits else (dtype,):
        most = _most_layers(arch, budget // _ITEM_BYTES[option], max(kept.values()) - 1)
        if most:
            fits.append(f"{'--dtype bf16 ' if option != dtype else ''}--layers {most}{' or fewer' if most > 1 else ''} "
                        "(a truncated copy; "
                        f"extrapolate per layer to the full {arch.text_layers})")
            break
    raise DoesNotFit(
        f"{arch.name} in {'fp32' if dtype == 'float32' else 'bf16'}"
        + (f" with {kept['text']} of {arch.text_layers} text layers" if kept["text"] != arch.text_layers else "")
        + f" is {format_bytes(weight_bytes)} of weights ({params:,} parameters), " + " and ".join(too_big) + ". "
        + ("What fits: " + "; ".join(fits) + "." if fits else "Nothing of this arch fits here.")
    )


# -- the weights -------------------------------------------------------------------------


def _chunk_seed(seed: int, index: int, chunk: int) -> int:
    # torch's CPU generator keeps 32 bits of a seed: hash the triple into them
    digest = hashlib.blake2b(f"{seed}:{index}:{chunk}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _initial_values(name: str, shape: tuple[int, ...], owner: Any, arch: Arch, dtype: Any, seed: int, index: int,
                    pool: ThreadPoolExecutor) -> torch.Tensor:
    """A random tensor as a fresh model's: norms at one, biases at zero, the logit scale at
    its starting value, everything else normal(0, 0.02) (the archs' initializer_range).

    Normal values are drawn in chunks on ``pool``'s threads, each chunk from its own
    generator seeded by (seed, tensor index, chunk index): the same seed gives the same
    weights whatever the number of threads, and a 16-core machine draws the 8B's 8.8
    billion values about as fast as it writes them."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "logit_scale":
        return torch.full(shape, _LOGIT_SCALE[arch.family], dtype=dtype)
    if leaf.endswith("bias"):  # also logit_bias and MultiheadAttention's in_proj_bias
        return torch.zeros(shape, dtype=dtype)
    if "norm" in type(owner).__name__.lower():  # LayerNorm, RMSNorm weights
        return torch.ones(shape, dtype=dtype)
    tensor = torch.empty(shape, dtype=dtype)
    flat = tensor.view(-1)

    def fill(chunk: int) -> None:
        generator = torch.Generator().manual_seed(_chunk_seed(seed, index, chunk))
        flat[chunk * _CHUNK:(chunk + 1) * _CHUNK].normal_(0.0, INIT_STD, generator=generator)

    # torch releases the GIL while it fills, so the threads run in parallel
    list(pool.map(fill, range(-(-flat.numel() // _CHUNK))))
    return tensor


def weight_entries(model: Any) -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, owning module) of every tensor a checkpoint of ``model`` stores, in
    state-dict order; a tied weight once, under its first name (as save_pretrained keeps it)."""
    seen: set[int] = set()
    buffers = {id(buffer) for buffer in model.buffers()}
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in buffers:
            # a persistent buffer holds computed values (position ids ...) that a meta model lacks
            raise NotImplementedError(f"{name}: persistent buffers are not supported by the random builder")
        owner = model.get_submodule(name.rpartition(".")[0])
        entries.append((name, tuple(tensor.shape), owner))
    return entries


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], Any]], dtype_name: str,
                       make: Callable[[str, tuple[int, ...], Any], torch.Tensor]) -> int:
    """Write one safetensors file tensor by tensor: the header first (offsets follow from the
    shapes), then each tensor as it is made, so that at most two are ever in memory (one
    being written while the next is drawn)."""
    import torch

    item = _ITEM_BYTES[dtype_name]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _owner in entries:
        size = math.prod(shape) * item
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype_name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(tensor: torch.Tensor) -> None:
        # raw bytes in the machine's order: safetensors is little-endian, as every machine torch runs on
        handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    with open(path, "wb") as handle, ThreadPoolExecutor(1) as writer:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        pending: Future[None] | None = None
        for name, shape, owner in entries:
            tensor = make(name, shape, owner)
            if pending is not None:
                pending.result()
            pending = writer.submit(write, tensor)
            del tensor
        if pending is not None:
            pending.result()
        handle.flush()
        os.fsync(handle.fileno())
    return offset


def write_random_weights(model: Any, arch: Arch, out_dir: Path, *, dtype: str, seed: int = 0,
                         max_shard_bytes: int = MAX_SHARD_BYTES,
                         progress: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Random weights for every tensor of ``model`` (on the meta device) as safetensors in
    ``out_dir``: model.safetensors, or shards and model.safetensors.index.json past
    ``max_shard_bytes``, as save_pretrained lays them out."""
    import torch

    torch_dtype = getattr(torch, dtype)
    item = _ITEM_BYTES[dtype]
    entries = weight_entries(model)
    shards: list[list[tuple[str, tuple[int, ...], Any]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * item
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    indexes = {name: index for index, (name, _, _) in enumerate(entries)}
    pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1))

    def make(name: str, shape: tuple[int, ...], owner: Any) -> torch.Tensor:
        return _initial_values(name, shape, owner, arch, torch_dtype, seed, indexes[name], pool)

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    with pool:
        for file_name, shard in zip(names, shards, strict=True):
            shard_bytes = sum(math.prod(shape) * item for _, shape, _ in shard)
            progress(f"writing {file_name} ({len(shard)} tensors, {format_bytes(shard_bytes)})")
            total += _write_safetensors(out_dir / file_name, shard, dtype, make)
            weight_map.update({name: file_name for name, _, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


# -- the model directory -----------------------------------------------------------------


def build_tokenizer(arch: Arch) -> Any:
    """A locally trained tokenizer of the family's kind, padded to the real vocabulary size."""
    from vkd.models.tiny import pad_vocabulary, train_qwen_tokenizer, train_tokenizer

    if arch.family == "qwen3-vl":
        tokenizer = train_qwen_tokenizer()
    else:
        tokenizer = train_tokenizer()  # lowercasing, as CLIP's and SigLIP's tokenizers do
        tokenizer.model_max_length = int(arch.text["max_position_embeddings"])
    return pad_vocabulary(tokenizer, arch.vocab_size)


def image_processor(arch: Arch) -> Any:
    from vkd.models.tiny import _image_processor, qwen3vl_image_processor

    if arch.family == "qwen3-vl":
        return qwen3vl_image_processor()
    return _image_processor(arch.family, int(arch.image_size or 224), int(arch.vision["patch_size"]))


def build_random(
    arch_name: str,
    out_dir: str | os.PathLike[str],
    *,
    layers: int | None = None,
    vision_layers: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write a random model of ``arch_name`` (a key of ``ARCHS``) into ``out_dir``, which must
    not exist or be empty; see the module docstring. Returns ``out_dir``.

    ``layers`` / ``vision_layers`` truncate the depth (``depths``); ``dtype`` "fp32" or "bf16"
    (default: the published checkpoint's). Raises ``DoesNotFit`` when the weights would not
    fit this machine's memory or disk. The directory appears complete or not at all: it is
    written beside ``out_dir`` and renamed into place at the end.
    """
    arch = get_arch(arch_name)
    dtype_name = resolve_dtype(arch, dtype)
    kept = depths(arch, layers, vision_layers)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder; give a new --out")
    weight_bytes = check_fits(arch, dtype_name, kept, out)
    full_parameters = count_parameters(arch)
    truncated = kept != {"text": arch.text_layers, "vision": arch.vision_layers}

    progress(f"tokenizer: trained locally, padded to {arch.vocab_size:,} entries")
    tokenizer = build_tokenizer(arch)
    config = build_config(arch, layers=kept["text"], vision_layers=kept["vision"], tokenizer=tokenizer)
    config.architectures = [model_class(arch.family).__name__]
    config.dtype = dtype_name
    model = meta_model(arch, config)
    parameters = sum(parameter.numel() for parameter in model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        progress(f"weights: {parameters:,} parameters, {format_bytes(weight_bytes)} in {dtype_name}")
        write_random_weights(model, arch, partial, dtype=dtype_name, seed=seed, max_shard_bytes=max_shard_bytes,
                             progress=progress)
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        image_processor(arch).save_pretrained(partial)
        from vkd.models.provenance import write_provenance

        record: dict[str, Any] = {
            "random": True, "arch": arch.name, "family": arch.family, "reference": arch.reference,
            "layers": kept, "full_layers": {"text": arch.text_layers, "vision": arch.vision_layers},
            "truncated": truncated, "parameters": parameters, "full_parameters": full_parameters,
            "published_parameters": arch.published_parameters, "dtype": dtype_name, "seed": seed,
            "tokenizer": f"byte-level BPE trained locally on a small word list, padded with unreachable entries "
                         f"to the real vocabulary ({arch.vocab_size:,}); texts split into more tokens than with "
                         "the real tokenizer",
            "built_by": "vkd model random",
        }
        if arch.family == "qwen3-vl":
            record["deepstack_visual_indexes"] = list(config.vision_config.deepstack_visual_indexes)
        write_provenance(partial, record)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
