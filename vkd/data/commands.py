"""``vkd data``: prepare pair files (Flickr30k Karpathy split, synthetic scenes).

``synth`` is defined here rather than in ``vkd.data.synth`` because that module draws with
numpy and PIL at import time, and ``vkd data --help`` must not load them.
"""

from __future__ import annotations

from pathlib import Path

import click

from vkd.data.flickr30k import flickr30k_command


@click.group()
def data() -> None:
    """Prepare pair files in vkd's JSON Lines format.

    \b
    Examples:
      vkd data synth --out demo-data --n 3000 --seed 0
      vkd data flickr30k --karpathy dataset_flickr30k.json --images flickr30k-images --out flickr
    """


@click.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write images/, train/val/test.jsonl and synth.json into.")
@click.option("--n", "n", type=int, default=3000, show_default=True, help="Number of images, all splits together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--val-frac", type=float, default=0.1, show_default=True, help="Share of images for val.")
@click.option("--test-frac", type=float, default=0.1, show_default=True,
              help="Share of images for test (which alone holds the held-out object-scene pairs).")
@click.option("--domain", type=click.Choice(["mixed", "general", "target"]), default="mixed", show_default=True,
              help="general: a pre-training set (alt-text wording, no target-only pairs); target: the domain "
                   "to fine-tune on (its own wording and pairs); one seed makes a matching pair of sets.")
@click.option("--overwrite", is_flag=True, help="Replace a data set already in --out.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG grid of the first 16 training images with a caption each.")
def synth_command(out_dir: Path, n: int, seed: int, size: int, val_frac: float, test_frac: float,
                  domain: str, overwrite: bool, preview: Path | None) -> None:
    """Render captioned synthetic scenes (objects on beaches, roads, snow ...) as pair files.

    Some object-scene combinations appear only in the test split, so test recall
    measures generalisation; val follows the train distribution.

    \b
    Example:
      vkd data synth --out demo-data --n 3000 --seed 0
      vkd data synth --out big --n 20000 --size 96 --test-frac 0.05 --preview big/preview.png
    """
    from vkd.data.synth import SPLITS, generate, preview_grid

    try:
        summary = generate(out_dir, n, seed=seed, size=size, val_frac=val_frac, test_frac=test_frac,
                           show_progress=True, overwrite=overwrite, domain=domain)
    except FileExistsError as error:
        raise click.UsageError(str(error)) from None
    except ValueError as error:
        option = str(error).split("=")[0].replace("_", "-")
        raise click.UsageError(f"--{option}: {error}") from None
    for split in SPLITS:
        click.echo(f"{split}: {summary.images[split]} images, {summary.captions[split]} captions "
                   f"-> {summary.files[split]}")
    held = ", ".join(f"{o}/{s}" for o, s in summary.heldout) or "none (no test split)"
    click.echo(f"held out of train and val: {held}")
    if preview is not None and summary.images["train"]:
        click.echo(f"preview: {preview_grid(summary.files['train'], preview)}")


data.add_command(flickr30k_command, "flickr30k")
data.add_command(synth_command, "synth")
