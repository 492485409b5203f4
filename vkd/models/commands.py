"""``vkd model``: build random models (tiny ones for tests and demos, real-size ones for
measuring costs) and say what a model directory is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vkd.models.random import ARCHS
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
    """Build random models and describe model directories.

    \b
    tiny    small random models of each family (tests, the demo)
    random  random models at real architectures' sizes (costs: speed, memory)
    info    what a model directory is: family, size, random or trained
    """


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
        base = SIZES["qwen3-vl"][size]
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


RANDOM_EXAMPLES = """\b
Examples:
  vkd model random --arch clip-vit-b32 --out models/random-b32
  vkd model random --arch qwen3-vl-embedding-8b --out models/random-8b           # bf16, 17.5 GB
  vkd model random --arch qwen3-vl-embedding-8b --layers 4 --out models/8b-4l    # per-layer costs
  vkd model info models/random-b32
"""


@model.command("random", epilog=RANDOM_EXAMPLES)
@click.option("--arch", type=click.Choice(list(ARCHS)), required=True,
              help="Real architecture to build (its published config.json values).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output model directory (new, or an empty folder).")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Keep at most N layers of every stack (a depth-truncated copy, recorded as such).  "
                   "[default: all]")
@click.option("--vision-layers", type=click.IntRange(min=1), default=None,
              help="Layers (Qwen3-VL: blocks) of the vision stack, overriding --layers for it.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Storage dtype.  [default: the published checkpoint's: bf16 for Qwen3-VL, fp32 for CLIP "
                   "and SigLIP]")
@click.option("--seed", type=int, default=0, show_default=True)
def random_command(arch: str, out: Path, layers: int | None, vision_layers: int | None, dtype: str | None,
                   seed: int) -> None:
    """Build a random model at a real architecture's size and save it as a plain model
    directory (safetensors) that load_encoder, vkd index and vkd export open.

    The config is the real checkpoint's (depth, widths, heads, vocabulary, image size), so
    parameters, memory and speed are the real model's; the weights are random and the
    tokenizer is trained locally (padded to the real vocabulary size), so its vectors mean
    nothing. vkd.json in the directory marks it random; `vkd model info` and describe()
    say so. Nothing is downloaded.

    Weights are drawn and written one tensor at a time: the build needs little memory
    (two tensors at most; the 8B's largest is 1.2 GB in bf16) but the model has to be
    loaded to be used, so a build whose weights exceed 80% of this machine's memory, or
    the free disk, is refused with what would fit. qwen3-vl-embedding-8b is 17.5 GB in bf16
    and 35.1 GB in fp32 (2b: 4.3 / 8.5 GB): on a 24 GB machine the 8B fits in bf16 only.
    """
    from vkd.models.random import (
        DoesNotFit,
        build_random,
        count_parameters,
        format_bytes,
        format_count,
        get_arch,
    )

    spec = get_arch(arch)
    try:
        path = build_random(arch, out, layers=layers, vision_layers=vision_layers, dtype=dtype, seed=seed,
                            progress=lambda message: click.echo(f"  {message}", err=True))
    except DoesNotFit as error:
        raise click.ClickException(str(error)) from None
    except (FileExistsError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    from vkd.models.provenance import read_provenance

    record = read_provenance(path) or {}
    kept, full = record.get("layers", {}), record.get("full_layers", {})
    full_count = count_parameters(spec)
    click.echo(f"wrote {path}: random weights at {spec.reference}'s architecture ({arch}), {record.get('dtype')}")
    if record.get("truncated"):
        click.echo(f"  parameters {record.get('parameters'):,} in this copy of {kept.get('text')}/{full.get('text')} "
                   f"text and {kept.get('vision')}/{full.get('vision')} vision layers; the full model has "
                   f"{full_count:,} (published: {format_count(spec.published_parameters)})")
    else:
        click.echo(f"  parameters {full_count:,} ({format_count(full_count)}; published: "
                   f"{format_count(spec.published_parameters)})")
    size = sum(item.stat().st_size for item in path.iterdir() if item.is_file())
    click.echo(f"  embedding dim {spec.dim}, {format_bytes(size)} on disk; `vkd model info {path}` describes it")


@model.command("info")
@click.argument("model_dir", metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def info_command(model_dir: str, as_json: bool) -> None:
    """What a model directory (or a hub id in the local hub cache) is, without loading it:
    family, embedding size, towers, parameters, size on disk, random or trained weights,
    the encoder options saved with it, its ONNX export.

    \b
    Example:
      vkd model info models/random-b32
      vkd model info out/student --json
    """
    from vkd.models.info import model_info

    try:
        info = model_info(model_dir)
    except (ValueError, OSError) as error:
        raise click.UsageError(str(error)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for label, value in _info_rows(info):
        click.echo(f"{label:<12}{value}")


def _info_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    from vkd.models.random import format_bytes, format_count

    towers = info["towers"]
    text, vision = towers["text"], towers["vision"]
    vision_shape = (f"patch {vision.get('patch_size')}, merge {vision.get('merge_size')}"
                    if info["backend"] == "qwen3-vl" else f"{vision.get('image_size')} px, patch {vision.get('patch_size')}")
    params = info["parameters"]
    provenance = info.get("provenance") or {}
    params_text = "unknown (no safetensors weights)" if params is None else (
        f"{params:,} ({format_count(params)}), stored as {', '.join(info['dtypes'])}")
    if provenance.get("truncated") and provenance.get("full_parameters"):
        params_text += f"; the full {provenance.get('arch')}: {provenance['full_parameters']:,}"
    onnx = info["onnx"]
    options = info["options"]
    rows = [
        ("model", info["name"]),
        ("family", f"{info['family']} ({info['architecture']}; {info['backend']} backend)"),
        ("weights", info["weights"]),
        ("dim", str(info["dim"])),
        ("text", f"{text.get('layers')} layers x {text.get('hidden_size')}, vocabulary {text.get('vocab_size'):,}"
                 if text.get("vocab_size") else f"{text.get('layers')} layers x {text.get('hidden_size')}"),
        ("vision", f"{vision.get('layers')} layers x {vision.get('hidden_size')}, {vision_shape}"),
        ("parameters", params_text),
        ("on disk", f"{format_bytes(info['size_on_disk_bytes'])} (weights {format_bytes(info['weights_bytes'])})"),
        ("options", ", ".join(f"{key}={value}" for key, value in options.items()) or "defaults"),
        ("onnx", "none" if onnx is None else f"{onnx['dir']} ({', '.join(onnx.get('towers', []))}; "
                                             f"{format_bytes(onnx.get('bytes', 0))})"),
    ]
    return rows
