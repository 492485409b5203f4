"""Tiny random models of every supported family, built from configs.

Tests and the demo never download anything: they build small models of the same classes
as the real checkpoints (CLIP, SigLIP, SigLIP 2, Qwen3-VL), with a BPE tokenizer trained
locally by the ``tokenizers`` library (byte-level; SigLIP 2: Gemma-style, as its hub checkpoints ship), and save them as ordinary model directories that
``load_encoder`` and ``from_pretrained`` open. The same code paths run as for real models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FAMILIES = ("clip", "siglip", "siglip2", "qwen3-vl")

# Dimensions per (family, size). "small" is roughly what the demo's teacher uses.
SIZES: dict[str, dict[str, dict[str, int]]] = {
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


def build_qwen3vl(out_dir: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0, **kwargs: Any) -> Path:
    from vkd.models.qwen3vl import build_tiny_qwen3vl

    return build_tiny_qwen3vl(out_dir, size=size, seed=seed, **kwargs)


BUILDERS: dict[str, Callable[..., Path]] = {
    "clip": lambda out, **kw: build_dual("clip", out, **kw),
    "siglip": lambda out, **kw: build_dual("siglip", out, **kw),
    "siglip2": lambda out, **kw: build_dual("siglip2", out, **kw),
    "qwen3-vl": build_qwen3vl,
}


def build_tiny(family: str, out_dir: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0, **kwargs: Any) -> Path:
    """Build a random model of ``family`` ("clip", "siglip", "siglip2", "qwen3-vl") into ``out_dir``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return BUILDERS[family](out_dir, size=size, seed=seed, **kwargs)
