"""Tiny random models of every supported family, built from configs, and the tokenizers
every random model gets.

Tests and the demo never download anything: they build small models of the same classes
as the real checkpoints (CLIP, SigLIP, SigLIP 2, Qwen3-VL), with a BPE tokenizer trained
locally by the ``tokenizers`` library (byte-level; SigLIP 2: Gemma-style, as its hub
checkpoints ship; Qwen3-VL: Qwen's special tokens and a chat template of the real one's
structure), and save them as ordinary model directories that ``load_encoder`` and
``from_pretrained`` open. The same code paths run as for real models. Each directory is
marked random in its ``vkd.json`` (``vkd.models.provenance``).

All builders live here (``vkd.models.random`` builds the real architectures' sizes with the
tokenizers made here); ``vkd.models.qwen3vl`` holds the encoder only, and this module
imports its constants when a Qwen3-VL model is built, never the other way round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FAMILIES = ("clip", "siglip", "siglip2", "qwen3-vl")

# Dimensions per (family, size). "small" is roughly what the demo's teacher uses.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "clip": {
        "tiny": {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "proj": 32},
        "small": {"hidden": 128, "layers": 4, "heads": 4, "image": 64, "patch": 8, "proj": 128},
    },
    "siglip": {
        "tiny": {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "proj": 32},
        "small": {"hidden": 128, "layers": 4, "heads": 4, "image": 64, "patch": 8, "proj": 128},
    },
    # "image" is the side of a square image at the patch budget: (image / patch)² patches
    "siglip2": {
        "tiny": {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "proj": 32},
        "small": {"hidden": 128, "layers": 4, "heads": 4, "image": 64, "patch": 8, "proj": 128},
    },
    # Qwen3-VL keeps the real patch (16), merge (2) and temporal patch (2) sizes at every size
    # (real 2B: text 2048 x 28 layers, vision 1024 x 24 blocks; see vkd.models.random).
    "qwen3-vl": {
        "tiny": {
            "hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mrope_section": [4, 2, 2],
            "vision_hidden": 32, "vision_depth": 2, "vision_heads": 2, "deepstack": [0, 1],
        },
        "small": {
            "hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16, "mrope_section": [4, 2, 2],
            "vision_hidden": 64, "vision_depth": 4, "vision_heads": 4, "deepstack": [1, 2, 3],
        },
    },
}

# </s> must not get id 2: CLIP's text pooler treats eos_token_id == 2 as the legacy OpenAI vocab
# and pools at the highest token id instead of at the end-of-text token.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

# Words the demo's captions and ordinary queries use, so the trained vocabulary is useful;
# byte-level BPE still encodes any text, these only decide which words get whole tokens.
BASE_CORPUS = """
a an the one two three four five some many of on in at by near under over with and beside next to
dog puppy cat kitten bird fish car truck boat ship tree house ball flower person man woman child
beach sea sand snow grass field road street water lake river sky night day room forest desert city
red blue green yellow white black brown orange pink purple grey gray gold silver dark light bright
small big large little tiny huge left right top bottom middle center parked flying sitting running
swimming standing lying playing photo picture image of view close up
""".split()


def train_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000, *, lowercase: bool = True) -> Any:
    """A byte-level BPE tokenizer (``transformers`` wrapper) trained on ``corpus``; with
    ``lowercase=False`` it keeps case, as some hub tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = list(corpus) if corpus is not None else []
    sentences += [" ".join(BASE_CORPUS)] + BASE_CORPUS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase()] if lowercase else [normalizers.NFKC()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=64,
    )


# Gemma's special tokens in Gemma's order, then its 256 byte-fallback tokens.
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def train_gemma_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000) -> Any:
    """A Gemma-style BPE tokenizer (metaspace "▁", byte fallback, case kept) trained on
    ``corpus``: the kind SigLIP 2's hub checkpoints ship. ``build_dual`` saves it with their
    ``tokenizer_class`` (GemmaTokenizer), so ``AutoTokenizer`` resolves it as it resolves theirs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = list(corpus) if corpus is not None else []
    sentences += [" ".join(BASE_CORPUS)] + BASE_CORPUS
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # the pipeline transformers' Siglip2Tokenizer rebuilds around a Gemma vocabulary
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=GEMMA_SPECIAL_TOKENS + [f"<0x{byte:02X}>" for byte in range(256)],
    )
    # words inside a sentence carry a leading "▁": train on them in that form
    tokenizer.train_from_iterator([" " + sentence for sentence in sentences], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=64,
    )
    return fast


def _dual_config(family: str, dims: dict[str, int], tokenizer: Any, max_text_length: int) -> Any:
    token_ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": max_text_length,
    }
    text = {
        "hidden_size": dims["hidden"], "intermediate_size": dims["hidden"] * 4,
        "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"], **token_ids,
    }
    vision = {
        "hidden_size": dims["hidden"], "intermediate_size": dims["hidden"] * 4,
        "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
        "image_size": dims["image"], "patch_size": dims["patch"],
    }
    if family == "clip":
        from transformers import CLIPConfig

        return CLIPConfig(
            text_config={**text, "projection_dim": dims["proj"]},
            vision_config={**vision, "projection_dim": dims["proj"]},
            projection_dim=dims["proj"],
        )
    if family == "siglip2":
        from transformers import Siglip2Config

        # NaFlex: a budget of patches instead of a fixed image size
        patches = (dims["image"] // dims["patch"]) ** 2
        vision = {key: value for key, value in vision.items() if key != "image_size"}
        return Siglip2Config(text_config={**text, "projection_size": dims["hidden"]},
                             vision_config={**vision, "num_patches": patches})
    from transformers import SiglipConfig

    # SigLIP has no projection_dim: its embedding is the hidden size of each tower.
    return SiglipConfig(text_config={**text, "projection_size": dims["hidden"]}, vision_config=vision)


def _image_processor(family: str, image_size: int, patch_size: int) -> Any:
    if family == "siglip2":
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        return Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=(image_size // patch_size) ** 2)
    if family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_dual(
    family: str,
    out_dir: str | os.PathLike[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    overrides: dict[str, int] | None = None,
    max_text_length: int = 32,
    lowercase_tokenizer: bool = True,
) -> Path:
    """A random CLIP, SigLIP or SigLIP 2 model directory. ``lowercase_tokenizer=False``: a
    byte-level tokenizer that keeps case (SigLIP 2 always gets its Gemma-style one, which does)."""
    import torch
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    dims = {**SIZES[family][size], **(overrides or {})}
    torch.manual_seed(seed)
    if family == "siglip2":
        tokenizer = train_gemma_tokenizer(corpus)
    else:
        tokenizer = train_tokenizer(corpus, lowercase=lowercase_tokenizer)
    tokenizer.model_max_length = max_text_length
    config = _dual_config(family, dims, tokenizer, max_text_length)
    model = {"clip": CLIPModel, "siglip": SiglipModel, "siglip2": Siglip2Model}[family](config).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if family == "siglip2":
        _declare_tokenizer_class(out, "GemmaTokenizer")
    _image_processor(family, dims["image"], dims["patch"]).save_pretrained(out)
    return out


def _declare_tokenizer_class(directory: Path, name: str) -> None:
    # what the hub checkpoints declare; save_pretrained writes the wrapper's own class name
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


# Qwen's special tokens, in the order the real tokenizer numbers them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]

# The structure of the real Qwen3-VL chat template (system turn, content parts rendered
# in order, image/video placeholders wrapped in vision start/end, generation prompt)
# without its tool-calling and reasoning branches, which embeddings never use. Real
# checkpoints carry their own template; the encoder only ever renders the model's.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}{{- render_content(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_qwen_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000) -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens and the Qwen3-VL-structured
    chat template: no BOS, eos "<|im_end|>", pad "<|endoftext|>", like the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vkd.models.qwen3vl import DEFAULT_INSTRUCTION, MAX_LENGTH, NULL_TEXT

    sentences = list(corpus) if corpus is not None else []
    sentences += [" ".join(BASE_CORPUS), DEFAULT_INSTRUCTION, NULL_TEXT, "system user assistant"] + BASE_CORPUS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH, chat_template=CHAT_TEMPLATE,
    )


def pad_vocabulary(tokenizer: Any, size: int) -> Any:
    """``tokenizer`` with its BPE vocabulary filled up to ``size`` entries.

    A BPE trainer stops when the corpus has no more pairs to merge, far below a real
    vocabulary (CLIP 49408, Qwen 151936). The fillers ("<|vkd_unused_N|>") have no merge that
    produces them, so tokenization is unchanged; they only make the tokenizer's length and
    file the real model's size, matching its embedding table row for row.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if len(tokenizer) >= size:
        return tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    taken = set(vocab.values()) | {token["id"] for token in state.get("added_tokens", [])}
    next_id, filler = 0, 0
    while len(taken) < size:
        while next_id in taken:
            next_id += 1
        name = f"<|vkd_unused_{filler}|>"
        filler += 1
        if name in vocab:
            continue
        vocab[name] = next_id
        taken.add(next_id)
    special = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
               if getattr(tokenizer, key, None) is not None}
    padded = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), model_max_length=tokenizer.model_max_length,
        chat_template=getattr(tokenizer, "chat_template", None), **special,
    )
    if len(padded) != size:
        raise RuntimeError(f"padding the vocabulary gave {len(padded)} tokens, not {size}")
    return padded


def qwen3vl_image_processor() -> Any:
    """The PIL image processor with the real Qwen3-VL patch (16), merge (2) and temporal
    patch (2) sizes and mean/std 0.5, as the hub checkpoints' preprocessor_config.json."""
    from vkd.models.qwen3vl import (
        MAX_PIXELS,
        MERGE_SIZE,
        MIN_PIXELS,
        PATCH_SIZE,
        TEMPORAL_PATCH_SIZE,
        _pil_image_processor_class,
    )

    return _pil_image_processor_class()(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    )


def qwen3vl_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config's token ids, taken from ``tokenizer`` (a random model's own vocabulary)."""
    token = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        # As in the real config: bos is <|endoftext|> although the tokenizer adds none.
        "bos_token_id": token("<|endoftext|>"),
        "image_token_id": token("<|image_pad|>"), "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"), "vision_end_token_id": token("<|vision_end|>"),
    }


def qwen3vl_config(text: dict[str, Any], vision: dict[str, Any], token_ids: dict[str, int], *,
                   tie_word_embeddings: bool) -> Any:
    """A ``Qwen3VLConfig`` from text and vision settings (the config.json keys) and token ids."""
    from transformers import Qwen3VLConfig

    from vkd.models.qwen3vl import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE

    text_ids = {key: token_ids[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    vision = {"patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE,
              **vision}
    top_ids = {key: value for key, value in token_ids.items() if key not in text_ids}
    return Qwen3VLConfig(text_config={**text, **text_ids}, vision_config=vision,
                         tie_word_embeddings=tie_word_embeddings, **top_ids)


def build_qwen3vl(
    out_dir: str | os.PathLike[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A random Qwen3-VL model directory laid out like a real checkpoint.

    Saved as ``Qwen3VLForConditionalGeneration`` (as the hub checkpoints are) with the
    real patch (16), merge (2) and temporal patch (2) sizes, the PIL image processor and
    a tokenizer carrying the chat template.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from vkd.models.qwen3vl import MAX_LENGTH

    sizes = SIZES["qwen3-vl"]
    if size not in sizes:
        raise ValueError(f"size={size!r}: choose one of {', '.join(sizes)}")
    dims = {**sizes[size], **(overrides or {})}
    if sum(dims["mrope_section"]) * 2 != dims["head_dim"]:
        raise ValueError(f"mrope_section {dims['mrope_section']} must sum to head_dim/2 = {dims['head_dim'] // 2}")
    torch.manual_seed(seed)
    tokenizer = train_qwen_tokenizer(corpus)
    config = qwen3vl_config(
        {
            "vocab_size": len(tokenizer), "hidden_size": dims["hidden"], "intermediate_size": dims["hidden"] * 2,
            "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
            "num_key_value_heads": dims["kv_heads"], "head_dim": dims["head_dim"],
            "max_position_embeddings": MAX_LENGTH,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 5_000_000.0,
                "mrope_section": list(dims["mrope_section"]), "mrope_interleaved": True,
            },
        },
        {
            "depth": dims["vision_depth"], "hidden_size": dims["vision_hidden"],
            "intermediate_size": dims["vision_hidden"] * 2, "num_heads": dims["vision_heads"],
            "out_hidden_size": dims["hidden"], "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(dims["deepstack"]),
        },
        qwen3vl_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    qwen3vl_image_processor().save_pretrained(out)
    return out


BUILDERS: dict[str, Callable[..., Path]] = {
    "clip": lambda out, **kw: build_dual("clip", out, **kw),
    "siglip": lambda out, **kw: build_dual("siglip", out, **kw),
    "siglip2": lambda out, **kw: build_dual("siglip2", out, **kw),
    "qwen3-vl": build_qwen3vl,
}


def build_tiny(family: str, out_dir: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0, **kwargs: Any) -> Path:
    """Build a random model of ``family`` ("clip", "siglip", "siglip2", "qwen3-vl") into ``out_dir``,
    marked random in its ``vkd.json``."""
    from vkd.models.provenance import write_provenance

    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = BUILDERS[family](out_dir, size=size, seed=seed, **kwargs)
    overrides = kwargs.get("overrides") or {}
    write_provenance(out, {
        "random": True, "arch": f"{family} ({size} test size)", "family": family, "size": size,
        **({"overrides": overrides} if overrides else {}), "seed": seed, "built_by": "vkd model tiny",
    })
    return out
