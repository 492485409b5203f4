"""Fixed image-size buckets: every image resized to the bucket nearest its aspect ratio.

Qwen3-VL's own resize gives each image its own patch grid (multiples of 32 near its size),
so its rotary positions and image-token count vary per image and no fixed graph can carry
it. A *bucket policy* trades that for a small set of fixed sizes: each image is resized
(bicubic, stretched, never cropped or padded) to the listed size whose aspect ratio is
closest to its own, measured as ``|ln(w/h) - ln(W/H)|`` (ties: the earlier bucket). The
ONNX export has one graph per bucket; the torch encoder applies the same policy when
loaded with ``image_buckets`` so that both give the same vectors (and fingerprint).

Pure Python, no numpy/torch: the torch-free ONNX backend and the torch encoder share it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: (width, height) in pixels
Bucket = tuple[int, int]

#: Aspect ratios (width:height) of the default set: square, the 4:3 of phone photos and
#: their portrait twin, and 16:9 video frames / screenshots both ways. 3:2 (most DSLRs) is
#: nearest to 4:3 and lands there (a 12 % stretch).
DEFAULT_BUCKET_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
#: Pixel budget of the default set: 448 x 448, 196 image tokens for a square image (the
#: natural resize allows up to 1800 tokens; a fixed budget keeps an image's cost bounded).
DEFAULT_BUCKET_PIXELS = 448 * 448
BUCKET_POLICY = "nearest aspect ratio (|ln(w/h) - ln(W/H)|, ties: first listed), bicubic resize to the bucket, no crop"


def format_bucket(bucket: Bucket) -> str:
    """``"WxH"``, the form options, manifests and the CLI use."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def parse_bucket(text: str | Sequence[int]) -> Bucket:
    """``"512x384"`` (width x height) or a (width, height) pair."""
    if isinstance(text, str):
        parts = text.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"image bucket {text!r}: expected WIDTHxHEIGHT, e.g. 512x384")
        width, height = (int(part) for part in parts)
    else:
        if len(text) != 2:
            raise ValueError(f"image bucket {text!r}: expected (width, height)")
        width, height = (int(value) for value in text)
    if width <= 0 or height <= 0:
        raise ValueError(f"image bucket {width}x{height}: both sides must be positive")
    return width, height


def parse_buckets(spec: str | Iterable[str | Sequence[int]] | None) -> tuple[Bucket, ...] | None:
    """Buckets from ``"448x448,512x384"``, a list of such strings or pairs; None/empty: no buckets.

    Duplicates are dropped, the order kept (it breaks ties in ``nearest_bucket``).
    """
    if spec is None:
        return None
    items = [part for part in spec.split(",") if part.strip()] if isinstance(spec, str) else list(spec)
    buckets = tuple(dict.fromkeys(parse_bucket(item.strip() if isinstance(item, str) else item) for item in items))
    return buckets or None


def bucket_names(buckets: Sequence[Bucket] | None) -> list[str] | None:
    return [format_bucket(bucket) for bucket in buckets] if buckets else None


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest ``width / height`` (in log space)."""
    if not buckets:
        raise ValueError("no image buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: both sides must be positive")
    ratio = math.log(width / height)
    # min() keeps the first of equal distances: the listed order decides ties
    return min(buckets, key=lambda bucket: abs(ratio - math.log(bucket[0] / bucket[1])))


def buckets_for_ratios(
    pixels: int = DEFAULT_BUCKET_PIXELS,
    ratios: Sequence[tuple[int, int]] = DEFAULT_BUCKET_RATIOS,
    *,
    factor: int = 32,
) -> tuple[Bucket, ...]:
    """One bucket per (width:height) ratio at about ``pixels`` pixels, each side rounded to
    the nearest multiple of ``factor`` as Qwen's smart_resize rounds (1:1 at 448² -> 448x448,
    4:3 -> 512x384, 16:9 -> 608x320)."""
    out = []
    for ratio_w, ratio_h in ratios:
        width = math.sqrt(pixels * ratio_w / ratio_h)
        height = math.sqrt(pixels * ratio_h / ratio_w)
        out.append((max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor)))
    return tuple(dict.fromkeys(out))
