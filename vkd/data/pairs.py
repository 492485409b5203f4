"""Image-text pair files: JSON Lines, one image per line with one caption or several.

A line looks like::

    {"image": "images/1000092795.jpg", "text": ["Two young guys ...", "..."], "image_id": "1000092795"}

* ``image`` is a path relative to the directory of the ``.jsonl`` file (absolute paths work too),
  so a pair file and its images can be moved together.
* ``text`` is one caption or a list of captions; a list becomes one pair per caption, all
  sharing the image.
* ``image_id`` (string or integer, optional) names the image for grouped evaluation;
  it defaults to the ``image`` path as written.

Every pair gets a ``sample_id`` that depends only on the image path as written and the
caption, not on the line number, so it names the pair across reorderings and edits of other
lines. The teacher cache does not key on it: a path says nothing about the bytes behind it,
so the cache keys rows by the image's content hash and the caption
(``vkd.distill.teacher.cache_key``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_KNOWN_KEYS = {"image", "text", "image_id"}


class PairFileError(ValueError):
    """A pair file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    image: Path
    """Resolved path of the image file."""
    text: str
    image_id: str
    sample_id: str


class PairSet:
    """The pairs of one file, in file order, with the image grouping evaluation needs."""

    def __init__(self, pairs: Iterable[Pair], source: Path | None = None) -> None:
        self.pairs: list[Pair] = list(pairs)
        self.source = source
        self._image_ids: list[str] = []
        self._images: list[Path] = []
        self._text_to_image = np.empty(len(self.pairs), dtype=np.int64)
        position: dict[str, int] = {}
        for index, pair in enumerate(self.pairs):
            slot = position.get(pair.image_id)
            if slot is None:
                slot = position[pair.image_id] = len(self._image_ids)
                self._image_ids.append(pair.image_id)
                self._images.append(pair.image)
            elif self._images[slot] != pair.image:
                raise PairFileError(
                    f"{source or 'pairs'}: image_id {pair.image_id!r} names two images, "
                    f"{self._images[slot]} and {pair.image}; give each image its own image_id"
                )
            self._text_to_image[index] = slot

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> Pair:
        return self.pairs[index]

    def __repr__(self) -> str:
        where = f", source={str(self.source)!r}" if self.source else ""
        return f"PairSet({len(self.pairs)} pairs, {len(self._images)} images{where})"

    def texts(self) -> list[str]:
        return [pair.text for pair in self.pairs]

    def sample_ids(self) -> list[str]:
        return [pair.sample_id for pair in self.pairs]

    def images(self) -> list[Path]:
        """Unique image paths, in order of first appearance."""
        return list(self._images)

    def image_ids(self) -> list[str]:
        """Unique image ids, aligned with :meth:`images`."""
        return list(self._image_ids)

    @property
    def text_to_image(self) -> np.ndarray:
        """int64 [len(self)]: for each pair, the index of its image in :meth:`images`."""
        return self._text_to_image.copy()

    @property
    def captions_by_image(self) -> dict[str, list[int]]:
        """image_id -> indices of its pairs (captions), in file order."""
        grouped: dict[str, list[int]] = {image_id: [] for image_id in self._image_ids}
        for index, slot in enumerate(self._text_to_image):
            grouped[self._image_ids[slot]].append(index)
        return grouped


def sample_id_for(image: str, text: str, occurrence: int = 0) -> str:
    """Stable id of a pair: a hash of the image path as written and the caption.

    ``occurrence`` tells apart exact duplicates within one file (the second copy gets
    ``"-1"`` appended, and so on), so ids stay unique.
    """
    digest = hashlib.sha1(f"{image}\n{text}".encode()).hexdigest()[:16]
    return digest if occurrence == 0 else f"{digest}-{occurrence}"


def _captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list) or not value:
        raise PairFileError(
            f"{where}: 'text' must be a string or a non-empty list of strings, got {_describe(value)}"
        )
    captions = []
    for position, caption in enumerate(value):
        if not isinstance(caption, str):
            raise PairFileError(f"{where}: 'text'[{position}] must be a string, got {_describe(caption)}")
        caption = caption.strip()
        if not caption:
            label = "'text'" if len(value) == 1 else f"'text'[{position}]"
            raise PairFileError(f"{where}: {label} is empty; every caption needs some words")
        captions.append(caption)
    return captions


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _validate_record(record: Any, where: str) -> tuple[str, list[str], str | None]:
    """(image as written, captions, image_id or None) of one record, or a PairFileError."""
    if not isinstance(record, dict):
        raise PairFileError(
            f'{where}: expected a JSON object like {{"image": "a.jpg", "text": "a dog"}}, got {_describe(record)}'
        )
    if "image" not in record:
        raise PairFileError(f"{where}: missing key 'image' (path of the image, relative to the pair file)")
    if "text" not in record:
        raise PairFileError(f"{where}: missing key 'text' (a caption or a list of captions)")
    unknown = sorted(set(record) - _KNOWN_KEYS)
    if unknown:
        raise PairFileError(f"{where}: unknown key(s) {unknown}; accepted keys are {sorted(_KNOWN_KEYS)}")
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        raise PairFileError(f"{where}: 'image' must be a non-empty path string, got {_describe(image)}")
    image_id = record.get("image_id")
    if image_id is not None:
        # bool is an int subclass; an id of `true` is a mistake, not an id
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or str(image_id).strip() == "":
            raise PairFileError(f"{where}: 'image_id' must be a non-empty string or an integer, got {_describe(image_id)}")
        image_id = str(image_id)
    return image, _captions(record["text"], where), image_id


def read_pairs(path: str | os.PathLike[str], *, check_images: bool = True) -> PairSet:
    """Read a JSON Lines pair file.

    Image paths are resolved against the file's directory. Blank lines are skipped.
    With ``check_images`` every image must exist as a file. Any problem raises
    :class:`PairFileError` naming the file and the (1-based) line.
    """
    path = Path(path)
    if not path.is_file():
        raise PairFileError(f"{path}: pair file not found (expected a .jsonl file of image-text pairs)")
    base = path.parent
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PairFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            image, captions, image_id = _validate_record(record, where)
            resolved = base / image
            if check_images and not resolved.is_file():
                raise PairFileError(
                    f"{where}: image {image!r} not found (looked for {resolved}; "
                    "image paths are relative to the pair file's directory)"
                )
            for caption in captions:
                key = f"{image}\n{caption}"
                occurrence = seen.get(key, 0)
                seen[key] = occurrence + 1
                pairs.append(Pair(
                    image=resolved,
                    text=caption,
                    image_id=image_id if image_id is not None else image,
                    sample_id=sample_id_for(image, caption, occurrence),
                ))
    return PairSet(pairs, source=path)


def write_pairs(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> int:
    """Write records ``{"image", "text", "image_id"?}`` as a pair file; returns the count.

    A relative ``image`` string is written as is (it is already relative to the file). A
    ``Path``, or an absolute string, is a filesystem path (a relative ``Path`` counts from
    the current directory) and is stored relative to the file's directory, so the file
    keeps working when the two are moved together. Records are
    checked as :func:`read_pairs` checks them (images need not exist yet). The file
    appears complete or not at all: it is written beside the target and renamed over it.
    """
    path = Path(path)
    base = path.parent.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            for index, record in enumerate(records):
                record = dict(record)
                image = record.get("image")
                if isinstance(image, os.PathLike) or (isinstance(image, str) and os.path.isabs(image)):
                    record["image"] = Path(os.path.relpath(Path(image).resolve(), base)).as_posix()
                _validate_record(record, f"{path}: record {index}")
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return count
