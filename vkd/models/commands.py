"""``vkd model``: make tiny random models for tests, demos and trying things out."""

from __future__ import annotations

from pathlib import Path

import click

from vkd.models.tiny import FAMILIES, SIZES

EXAMPLES = """\b
Examples:
  vkd model tiny --family clip --out models/tiny-clip
  vkd model tiny --family clip --corpus pairs.jsonl --out models/clip-mine
  vkd model tiny --family clip --hidden 64 --heads 4 --layers 2 --proj 64 \\
      --image-size 64 --patch-size 16 --out models/clip-64
  vkd model tiny --family qwen3-vl --size small --corpus pairs.jsonl --out models/qwen-tiny
  vkd eval --model models/tiny-clip --data pairs.jsonl
"""

# Which dimension options each family takes. Qwen3-VL keeps the real patch (16) and merge (2)
# sizes and takes images at their own resolution, and SigLIP's embedding is its hidden size
# (SigLIP 2: --image-size sets the patch budget, (image / patch)² patches).
DIMENSION_OPTIONS = {
    "clip": ("hidden", "heads", "layers", "proj", "image", "patch"),
    "siglip": ("hidden", "heads", "layers", "image", "patch"),
    "siglip2": ("hidden", "heads", "layers", "image", "patch"),
    "qwen3-vl": ("hidden", "heads", "layers"),
}
FLAGS = {"hidden": "--hidden", "heads": "--heads", "layers": "--layers", "proj": "--proj",
         "image": "--image-size", "patch": "--patch-size"}


@click.group()
def model() -> None:
    """Model utilities."""


def _dimensions(family: str, size: str, given: dict[str, int | None]) -> dict[str, int]:
    """The options given, checked against the family and each other (``click.UsageError``)."""
    chosen = {key: value for key, value in given.items() if value is not None}
    accepted = DIMENSION_OPTIONS.get(family, ())
    for key in chosen:
        if key not in accepted:
            raise click.UsageError(f"{FLAGS[key]} does not apply to {family}; it takes "
                                   + (", ".join(FLAGS[k] for k in accepted) or "none of the dimension options"))
    if not chosen:  # the size's own dimensions fit
        return chosen
    if family == "qwen3-vl":
        from vkd.models.qwen3vl import TINY_SIZES

        base = TINY_SIZES[size]
        heads = chosen.get("heads", base["heads"])
        if heads % base["kv_heads"]:
            raise click.UsageError(f"--heads {heads} is not a multiple of the {base['kv_heads']} key/value "
                                   f"heads of size {size}")
        return chosen
    dims = {**SIZES[family][size], **chosen}
    for key, unit in (("hidden", "heads"), ("image", "patch")):
        if dims[key] % dims[unit]:
            raise click.UsageError(f"{FLAGS[key]} {dims[key]} is not a multiple of {FLAGS[unit]} {dims[unit]}"
                                   + ("" if key in chosen and unit in chosen else f" (size {size})"))
    return chosen


def _captions(corpus: Path) -> list[str]:
    from vkd.data.pairs import PairFileError, read_pairs

    try:
        # the tokenizer needs the captions only: the images need not be at hand
        texts = read_pairs(corpus, check_images=False).texts()
    except PairFileError as error:
        raise click.BadParameter(str(error), param_hint="--corpus") from None
    if not texts:
        raise click.BadParameter(f"{corpus}: no captions in the file", param_hint="--corpus")
    return texts


@model.command("tiny", epilog=EXAMPLES)
@click.option("--family", type=click.Choice(FAMILIES), required=True, help="Model family to build.")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True,
              help="Starting dimensions; the options below override them.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output model directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A vkd pairs file (.jsonl) whose captions train the tokenizer, so their words get "
                   "whole tokens (its images need not exist).")
@click.option("--hidden", type=click.IntRange(min=1), default=None, help="Hidden size of each tower.")
@click.option("--heads", type=click.IntRange(min=1), default=None, help="Attention heads (must divide --hidden).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Layers of each tower.")
@click.option("--proj", type=click.IntRange(min=1), default=None, help="Embedding size (CLIP's projection).")
@click.option("--image-size", "image", type=click.IntRange(min=1), default=None, help="Input image side (CLIP, SigLIP).")
@click.option("--patch-size", "patch", type=click.IntRange(min=1), default=None,
              help="Patch side (must divide --image-size).")
def tiny(family: str, size: str, out: str, seed: int, corpus: Path | None, hidden: int | None, heads: int | None,
         layers: int | None, proj: int | None, image: int | None, patch: int | None) -> None:
    """Build a random model of a real family from its config, with a locally trained
    tokenizer, and save it as a plain model directory (nothing is downloaded)."""
    overrides = _dimensions(family, size, {"hidden": hidden, "heads": heads, "layers": layers, "proj": proj,
                                           "image": image, "patch": patch})
    texts = _captions(corpus) if corpus is not None else None

    from vkd.models import load_encoder
    from vkd.models.tiny import build_tiny

    path = build_tiny(family, out, size=size, seed=seed, corpus=texts, overrides=overrides or None)
    encoder = load_encoder(path, device="cpu")
    click.echo(f"wrote {path} ({family}, {size}): dim={encoder.dim}, "
               f"params={encoder.num_parameters():,}, fingerprint={encoder.fingerprint}")
    if texts is not None:
        click.echo(f"tokenizer trained on {len(texts)} captions from {corpus}")
