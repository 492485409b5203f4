"""``vkd model``: make tiny random models for tests, demos and trying things out."""

from __future__ import annotations

import click

from vkd.models.tiny import FAMILIES


@click.group()
def model() -> None:
    """Model utilities."""


@model.command("tiny")
@click.option("--family", type=click.Choice(FAMILIES), required=True, help="Model family to build.")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output model directory.")
@click.option("--seed", type=int, default=0, show_default=True)
def tiny(family: str, size: str, out: str, seed: int) -> None:
    """Build a random model of a real family from its config, with a locally trained
    tokenizer, and save it as a plain model directory (nothing is downloaded).

    \b
    Example:
      vkd model tiny --family clip --size tiny --out models/tiny-clip
      vkd eval --model models/tiny-clip --data pairs.jsonl
    """
    from vkd.models import load_encoder
    from vkd.models.tiny import build_tiny

    path = build_tiny(family, out, size=size, seed=seed)
    encoder = load_encoder(path, device="cpu")
    click.echo(f"wrote {path} ({family}, {size}): dim={encoder.dim}, "
               f"params={encoder.num_parameters():,}, fingerprint={encoder.fingerprint}")
