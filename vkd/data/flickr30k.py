"""Flickr30k (Karpathy split) to vkd pair files.

The Karpathy JSON (``dataset_flickr30k.json`` from ``caption_datasets.zip``) lists every
image once with its split and its five captions::

    {"dataset": "flickr30k", "images": [{"filename": "1000092795.jpg", "split": "train",
      "imgid": 0, "sentences": [{"raw": "Two young guys ...", ...}, ...]}, ...]}

It becomes ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``, one line per image with its
captions as a list, image paths relative to the output directory. ``restval`` images go
to train, as is usual. The same layout serves the COCO Karpathy JSON: an entry's
``filepath`` (e.g. ``val2014``), when present, is a sub-folder of the images directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

SPLITS = ("train", "val", "test")
# Karpathy's split names -> ours; restval is the part of the original val set given to training
_SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
# Images per split in the standard Flickr30k Karpathy split
STANDARD_COUNTS = {"train": 29000, "val": 1014, "test": 1000}


class KarpathyFormatError(ValueError):
    """The Karpathy JSON is not what the converter expects; the message names the entry."""


class MissingImagesError(FileNotFoundError):
    def __init__(self, missing: list[Path], images_dir: Path) -> None:
        self.missing = missing
        shown = ", ".join(str(path) for path in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        super().__init__(
            f"{len(missing)} image(s) listed in the Karpathy JSON are not under {images_dir}: "
            f"{shown}{more}. Point --images at the folder holding the Flickr30k .jpg files, "
            "or pass --skip-missing to drop these images"
        )


@dataclass
class ConversionSummary:
    out_dir: Path
    images: dict[str, int] = field(default_factory=dict)
    captions: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    missing: list[Path] = field(default_factory=list)
    dataset: str | None = None

    def warnings(self) -> list[str]:
        """Reasons the result is not the standard Flickr30k split (empty when it is)."""
        notes = []
        if self.dataset not in (None, "flickr30k"):
            notes.append(f"the JSON says dataset={self.dataset!r}, not 'flickr30k'; its splits were kept as they are")
        elif self.images != STANDARD_COUNTS:
            got = ", ".join(f"{split} {self.images.get(split, 0)}" for split in SPLITS)
            want = ", ".join(f"{split} {count}" for split, count in STANDARD_COUNTS.items())
            notes.append(
                f"image counts ({got}) differ from the standard Flickr30k Karpathy split ({want}); "
                "Recall@K on this test set is not comparable with published numbers"
            )
        for split in SPLITS:
            if self.images.get(split, 0) == 0:
                notes.append(f"{split}.jsonl is empty: no {split} images in the JSON")
        if self.missing:
            notes.append(f"skipped {len(self.missing)} image(s) with no file under the images folder")
        return notes


def _entries(karpathy_json: Path) -> tuple[list[dict[str, Any]], str | None]:
    if not karpathy_json.is_file():
        raise KarpathyFormatError(
            f"{karpathy_json}: file not found (expected dataset_flickr30k.json from Karpathy's caption_datasets.zip)"
        )
    try:
        with karpathy_json.open(encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise KarpathyFormatError(f"{karpathy_json}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise KarpathyFormatError(
            f"{karpathy_json}: expected an object with an 'images' list "
            '({"images": [{"filename", "split", "sentences"}, ...]})'
        )
    dataset = document.get("dataset")
    return document["images"], dataset if isinstance(dataset, str) else None


def _parse_entry(entry: Any, where: str) -> tuple[str, str, list[str], str]:
    """(relative image path, our split, captions, image_id) of one Karpathy entry."""
    if not isinstance(entry, dict):
        raise KarpathyFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise KarpathyFormatError(f"{where}: 'filename' must be a non-empty string, got {filename!r}")
    split = entry.get("split")
    if split not in _SPLIT_OF:
        raise KarpathyFormatError(f"{where} ({filename}): 'split' is {split!r}; accepted: {sorted(_SPLIT_OF)}")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        raise KarpathyFormatError(f"{where} ({filename}): 'sentences' must be a list of {{\"raw\": caption}}")
    captions = []
    for position, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise KarpathyFormatError(f"{where} ({filename}): sentences[{position}] has no 'raw' caption string")
        if raw.strip():
            captions.append(raw.strip())
    if not captions:
        raise KarpathyFormatError(f"{where} ({filename}): no non-empty caption in 'sentences'")
    filepath = entry.get("filepath")
    relative = f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename
    image_id = entry.get("imgid", entry.get("cocoid"))
    image_id = str(image_id) if isinstance(image_id, (int, str)) and not isinstance(image_id, bool) else relative
    return relative, _SPLIT_OF[split], captions, image_id


def convert_karpathy(
    karpathy_json: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    skip_missing: bool = False,
) -> ConversionSummary:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` under ``out_dir``.

    Every entry is checked before anything is written, so a bad JSON or missing images
    leave ``out_dir`` untouched. Missing image files raise :class:`MissingImagesError`
    listing them, unless ``skip_missing`` drops them (they are listed in the summary).
    """
    from vkd.data.pairs import write_pairs

    karpathy_json, images_dir, out_dir = Path(karpathy_json), Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found (the folder holding the Flickr30k .jpg files)")
    entries, dataset = _entries(karpathy_json)
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    missing: list[Path] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(entries):
        where = f"{karpathy_json}: images[{index}]"
        relative, split, captions, image_id = _parse_entry(entry, where)
        if image_id in seen:
            raise KarpathyFormatError(f"{where} ({relative}): image id {image_id} is also used by {seen[image_id]}")
        seen[image_id] = relative
        image = images_dir / relative
        if not image.is_file():
            missing.append(image)
            continue
        records[split].append({"image": image.resolve(), "text": captions, "image_id": image_id})
    if missing and not skip_missing:
        raise MissingImagesError(missing, images_dir)

    summary = ConversionSummary(out_dir=out_dir, missing=missing, dataset=dataset)
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        write_pairs(path, records[split])
        summary.files[split] = path
        summary.images[split] = len(records[split])
        summary.captions[split] = sum(len(record["text"]) for record in records[split])
    return summary


EXAMPLE = """\b
Example:
  vkd data flickr30k --karpathy caption_datasets/dataset_flickr30k.json \\
      --images flickr30k-images --out data/flickr30k
  vkd eval --model openai/clip-vit-base-patch32 --data data/flickr30k/test.jsonl
"""


@click.command("flickr30k", epilog=EXAMPLE)
@click.option(
    "--karpathy", "karpathy_json", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="dataset_flickr30k.json from Karpathy's caption_datasets.zip.",
)
@click.option(
    "--images", "images_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Folder holding the Flickr30k images (1000092795.jpg, ...).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Output folder for train.jsonl, val.jsonl and test.jsonl.",
)
@click.option("--skip-missing", is_flag=True, help="Drop images whose file is missing (listed) instead of failing.")
def flickr30k_command(karpathy_json: Path, images_dir: Path, out_dir: Path, skip_missing: bool) -> None:
    """Convert Flickr30k (Karpathy split) into vkd pair files.

    One line per image with its five captions; restval images go to train.
    """
    try:
        summary = convert_karpathy(karpathy_json, images_dir, out_dir, skip_missing=skip_missing)
    except (KarpathyFormatError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    for path in summary.missing[:20]:
        click.echo(f"missing, skipped: {path}", err=True)
    if len(summary.missing) > 20:
        click.echo(f"missing, skipped: ... and {len(summary.missing) - 20} more", err=True)
    width = max(len(str(path)) for path in summary.files.values())
    for split in SPLITS:
        click.echo(
            f"{str(summary.files[split]):<{width}}  {summary.images[split]:>6} images  "
            f"{summary.captions[split]:>7} captions"
        )
    for note in summary.warnings():
        click.echo(f"warning: {note}", err=True)
