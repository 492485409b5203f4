"""``vkd data``: prepare pair files (Flickr30k Karpathy split, synthetic scenes)."""

from __future__ import annotations

import click

from vkd.data.flickr30k import flickr30k_command
from vkd.data.synth import synth_command


@click.group()
def data() -> None:
    """Prepare pair files in vkd's JSON Lines format.

    \b
    Examples:
      vkd data synth --out demo-data --n 3000 --seed 0
      vkd data flickr30k --karpathy dataset_flickr30k.json --images flickr30k-images --out flickr
    """


data.add_command(flickr30k_command, "flickr30k")
data.add_command(synth_command, "synth")
