"""Recall@K for image-text retrieval, both directions, grouped by image.

* text -> image: every caption is a query over the unique images; a hit at K when its
  own image is among the K best.
* image -> text: every image that has captions is a query over all captions; a hit at K
  when ANY of its captions is among the K best (the usual Flickr30k/COCO protocol).

Scores are dot products, so pass L2-normalised vectors to rank by cosine.

Ranks are counted, never sorted: a query's rank is the number of wrong items that score
at least as high as its best right item. Ties therefore count against the query: an
item that scores exactly as high as the right one is placed ahead of it. That is
deterministic, needs no argsort of the similarity matrix, and gives a collapsed model
(every score equal) a recall of 0 rather than 100.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

if TYPE_CHECKING:
    from vkd.data.pairs import PairSet
    from vkd.models.base import Encoder

DEFAULT_KS = (1, 5, 10)
# similarity entries per block: 2**24 float32 = 64 MiB, plus a boolean mask of the same shape
_BLOCK_ELEMENTS = 1 << 24


def _check_inputs(
    text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    text_emb = np.asarray(text_emb, dtype=np.float32)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_to_image = np.asarray(text_to_image)
    if text_emb.ndim != 2 or image_emb.ndim != 2:
        raise ValueError(
            f"text_emb and image_emb must be 2-D [n, dim], got shapes {text_emb.shape} and {image_emb.shape}"
        )
    if text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"text and image embeddings differ in dimension: {text_emb.shape[1]} vs {image_emb.shape[1]}")
    if len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError(f"need at least one text and one image, got {len(text_emb)} texts and {len(image_emb)} images")
    if text_to_image.shape != (len(text_emb),) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(
            f"text_to_image must be an integer array with one image index per text ({len(text_emb)}), "
            f"got dtype {text_to_image.dtype} and shape {text_to_image.shape}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= len(image_emb):
        bad = int(text_to_image[(text_to_image < 0) | (text_to_image >= len(image_emb))][0])
        raise ValueError(f"text_to_image holds {bad}, outside the {len(image_emb)} images (0..{len(image_emb) - 1})")
    for name, values in (("text_emb", text_emb), ("image_emb", image_emb)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or infinite values; the encoder's output is broken")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return text_emb, image_emb, text_to_image.astype(np.int64), ks


def _block_rows(columns: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(columns, 1))


def text_to_image_ranks(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of each text's image: images other than it scoring >= its score."""
    ranks = np.empty(len(text_emb), dtype=np.int64)
    step = _block_rows(len(image_emb))
    for start in range(0, len(text_emb), step):
        stop = min(start + step, len(text_emb))
        scores = text_emb[start:stop] @ image_emb.T
        rows = np.arange(stop - start)
        truth = scores[rows, text_to_image[start:stop]]
        # the true image itself always satisfies >=, hence the -1
        ranks[start:stop] = (scores >= truth[:, None]).sum(axis=1) - 1
    return ranks


def image_to_text_ranks(
    text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of images with captions, 0-based rank of each one's best caption).

    The rank is the number of other images' captions scoring >= the best of its own;
    its other captions never count against it.
    """
    queries = np.unique(text_to_image)
    ranks = np.empty(len(queries), dtype=np.int64)
    step = _block_rows(len(text_emb))
    for start in range(0, len(queries), step):
        block = queries[start : start + step]
        scores = image_emb[block] @ text_emb.T
        own = text_to_image[None, :] == block[:, None]
        best = np.where(own, scores, -np.inf).max(axis=1)
        ranks[start : start + len(block)] = ((scores >= best[:, None]) & ~own).sum(axis=1)
    return queries, ranks


def recall_at_k(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K in both directions, as percentages (0-100).

    ``text_emb`` [n_texts, d] and ``image_emb`` [n_images, d] hold one row per caption and
    one per unique image; ``text_to_image[i]`` is the row of caption ``i``'s image.
    Images without captions take part only as distractors for text -> image.

    Returns ``t2i_R@K`` and ``i2t_R@K`` for each K, ``t2i_medr`` / ``i2t_medr`` (median
    1-based rank) and ``rsum`` (the sum of every R@K, both directions). Memory stays
    within a few blocks of ~16M similarities whatever the sizes.
    """
    text_emb, image_emb, text_to_image, ks = _check_inputs(text_emb, image_emb, text_to_image, ks)
    t2i = text_to_image_ranks(text_emb, image_emb, text_to_image)
    _, i2t = image_to_text_ranks(text_emb, image_emb, text_to_image)
    metrics: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float(100.0 * np.mean(ranks < k))
        metrics[f"{direction}_medr"] = float(np.median(ranks + 1))
    metrics["rsum"] = float(sum(metrics[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks))
    return metrics


def evaluate_encoder(
    encoder: Encoder,
    pairs: PairSet | str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    show_progress: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Recall@K of ``encoder`` on a pair file (or a ``PairSet``).

    Each unique image is encoded once and every caption once: captions as queries
    (``encode_text``: the query instruction) and images as documents (``encode_images``: the
    document instruction), for both directions, as the embeddings would be in an index. Returns the metrics of
    :func:`recall_at_k` plus ``n_images`` and ``n_texts``.
    """
    from vkd.data.pairs import PairSet, read_pairs

    pair_set = pairs if isinstance(pairs, PairSet) else read_pairs(pairs)
    if len(pair_set) == 0:
        raise ValueError(f"{pair_set.source or 'pairs'}: no pairs to evaluate on")
    images = [str(path) for path in pair_set.images()]
    image_emb = encoder.encode_images(images, batch_size=batch_size, show_progress=show_progress)
    text_emb = encoder.encode_text(pair_set.texts(), batch_size=batch_size, show_progress=show_progress)
    metrics: dict[str, Any] = dict(recall_at_k(text_emb, image_emb, pair_set.text_to_image, ks=ks))
    metrics["n_images"] = len(images)
    metrics["n_texts"] = len(pair_set)
    return metrics


def format_table(metrics: dict[str, Any], ks: Sequence[int] = DEFAULT_KS) -> str:
    """The metrics as a small text table (one row per direction)."""
    header = f"{'':<12}" + "".join(f"{f'R@{k}':>8}" for k in ks) + f"{'medr':>8}"
    lines = [header]
    for direction, label in (("t2i", "text→image"), ("i2t", "image→text")):
        cells = "".join(f"{metrics[f'{direction}_R@{k}']:>8.1f}" for k in ks)
        lines.append(f"{label:<12}{cells}{metrics[f'{direction}_medr']:>8.1f}")
    lines.append(f"{'rsum':<12}{metrics['rsum']:>8.1f}")
    return "\n".join(lines)


EXAMPLE = """\b
Examples:
  vkd eval --model out/student --data data/flickr30k/test.jsonl
  vkd eval --model runs/x --data test.jsonl      # a vkd distill run: evaluates runs/x/model
  vkd eval --model openai/clip-vit-base-patch32 --data data/flickr30k/test.jsonl --json
"""


@click.command("eval", epilog=EXAMPLE)
@click.option("--model", required=True,
              help="Model directory or hub id (anything vkd.load_encoder opens), or a vkd distill output_dir.")
@click.option(
    "--data", "data_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="Pair file (.jsonl) to evaluate on, e.g. test.jsonl from `vkd data flickr30k`.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Encoding batch size.")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--onnx", is_flag=True, help="Use the model's ONNX export (<model>/onnx) when it has one.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
@click.option("--query-instruction", default=None, metavar="TEXT",
              help="Qwen3-VL: instruction of the captions (queries).  [default: the model's own]")
@click.option("--document-instruction", default=None, metavar="TEXT",
              help="Qwen3-VL: instruction of the images (documents).  [default: the model's own]")
def eval_command(
    model: str, data_path: Path, batch_size: int | None, device: str | None, onnx: bool, as_json: bool,
    query_instruction: str | None = None, document_instruction: str | None = None,
) -> None:
    """Recall@1/5/10 of a model on a pair file, text→image and image→text.

    Percentages; image→text counts a hit when any of the image's captions is in the top K.
    MODEL may also be a `vkd distill` output directory: its model/ is evaluated.
    """
    from vkd.distill.rundir import resolve_model_option

    model = resolve_model_option(model, "evaluating {model}")

    from vkd.data.pairs import PairFileError, read_pairs

    try:
        pair_set = read_pairs(data_path)
    except PairFileError as error:
        raise click.ClickException(str(error)) from None
    if len(pair_set) == 0:
        raise click.ClickException(f"{data_path}: no pairs in the file; give a pair file with captions")

    from vkd.models import load_encoder

    options: dict[str, Any] = {"prefer": "onnx" if onnx else "torch"}
    if device is not None:
        options["device"] = device
    if batch_size is not None:
        options["batch_size"] = batch_size
    # CLIP and SigLIP accept instructions and ignore them (they take none)
    for key, value in (("query_instruction", query_instruction), ("document_instruction", document_instruction)):
        if value is not None:
            options[key] = value
    try:
        encoder = load_encoder(model, **options)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load model {model!r}: {error}") from None

    metrics = evaluate_encoder(encoder, pair_set, batch_size=batch_size, show_progress=not as_json)
    if as_json:
        click.echo(json.dumps({"model": model, "model_options": encoder.load_options(), "data": str(data_path),
                               **metrics}, indent=2))
        return
    click.echo(f"model  {model} ({encoder.family}, {encoder.dim}-d)")
    click.echo(f"data   {data_path}: {metrics['n_images']} images, {metrics['n_texts']} captions")
    click.echo(format_table(metrics))
